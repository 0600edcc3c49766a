from concurrent.futures import ThreadPoolExecutor

from infra.workers import claim_worker_gpu, process_cached, worker_gpu


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
