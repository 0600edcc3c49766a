from concurrent.futures import ThreadPoolExecutor

from infra.workers import claim_worker_gpu, process_cached, release_cached, worker_gpu


def test_process_cached_builds_once_per_key_even_when_asked_concurrently():
    built = []

    def build(tag):
        built.append(tag)
        return object()

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: process_cached(f"test-workers:{i % 2}", lambda: build(i % 2)), range(32)))
    assert sorted(built) == [0, 1]  # one build per key, not one per caller
    assert len({id(o) for o in got}) == 2 and got[0] is got[2] and got[1] is got[3]


def test_no_worker_gpu_outside_a_dask_worker_or_without_several_gpus():
    assert worker_gpu() is None  # this process is no Dask worker (and CI has no GPU)
    assert claim_worker_gpu() is None  # nothing to claim: the current device is left alone


def test_released_objects_are_let_go_and_built_again_on_next_use():
    """Between stages the flow's process lets go of the models earlier stages cached (infra.memory
    .release_stage_memory): nothing else holds them, so they are freed; the next use builds a new one."""
    import weakref

    from infra.memory import release_stage_memory

    class Model:
        pass

    first = process_cached("test-workers:release", Model)
    ref = weakref.ref(first)
    del first
    release_stage_memory()
    assert ref() is None
    assert process_cached("test-workers:release", Model) is not None
    assert release_cached() == 1 and release_cached() == 0
