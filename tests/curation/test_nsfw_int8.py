"""The int8 open_nsfw fast path makes the fp32 network's decisions (near-threshold scores re-checked in fp32), and
`nsfw.backend: auto` is a measured choice among backends that all do."""

from __future__ import annotations

import numpy as np
import pytest

import curation.nsfw as nsfw
from bench.nsfw import real_images
from curation.nsfw import OpenNsfw, OpenNsfwInt8, measured_backend, resolve_backend
from infra.config.ingest import NsfwConfig


def _scores(scorer, images):
    return np.concatenate([scorer.score(images[i : i + 64]) for i in range(0, len(images), 64)])


@pytest.fixture(scope="module")
def labelled():
    """141 real images (scikit-image photographs, lfw_subset faces and non-faces, MNIST digits) labelled by fp32."""
    images = real_images()[::3]
    return images, _scores(OpenNsfw(NsfwConfig()), images)


def test_int8_decisions_agree_with_fp32(labelled):
    images, fp32 = labelled
    # The default threshold, and the median fp32 score: half the images then lie near the threshold.
    for threshold in (0.8, float(np.median(fp32))):
        fast = OpenNsfwInt8(NsfwConfig(threshold=threshold))
        agree = ((_scores(fast, images) >= threshold) == (fp32 >= threshold)).mean()
        assert agree >= 0.995, (threshold, agree)
        assert agree == 1.0  # measured: every decision, at both thresholds
        if threshold != 0.8:
            assert fast.rechecked > len(images) // 4  # the re-check did the work
            bare = OpenNsfwInt8(NsfwConfig(threshold=threshold, recheck_margin=0.0))
            assert ((_scores(bare, images) >= threshold) != (fp32 >= threshold)).sum() > 0  # int8 alone flips some


def test_int8_logits_stay_within_the_recheck_margin_on_this_cpu(labelled):
    """What makes the re-check sound: the int8 network's logit error against fp32 stays below the margin, on this
    machine's kernels. On x86 without VNNI the full-range model broke it (4.51 on 421 real images of a Zen 3 VM:
    saturating int16 sums), hence 7-bit weights there (`int8_reduce_range`)."""
    images, fp32 = labelled
    bare = _scores(OpenNsfwInt8(NsfwConfig(recheck_margin=0.0)), images)

    def logit(p):
        p = np.clip(p.astype(np.float64), 1e-12, 1 - 1e-12)
        return np.log(p) - np.log1p(-p)

    error = np.abs(logit(bare) - logit(fp32))
    assert error.max() < nsfw.INT8_RECHECK_MARGIN * 0.75, error.max()  # measured: 1.69 (Zen 3, 7-bit), 1.53 (VNNI)


def test_weights_keep_to_7_bits_only_where_int8_sums_saturate():
    assert nsfw.int8_reduce_range("x86_64", {"avx2", "fma"})  # Zen 3, Haswell..Cascade Lake without VNNI
    assert not nsfw.int8_reduce_range("x86_64", {"avx2", "avx512f", "avx512_vnni"})  # Zen 4, Ice Lake, Sapphire Rapids
    assert not nsfw.int8_reduce_range("x86_64", {"avx2", "avx_vnni"})  # Alder Lake
    assert not nsfw.int8_reduce_range("aarch64", set())
    assert nsfw.int8_model_path().name.endswith("-rr.onnx") == nsfw.int8_reduce_range()


def test_threads_change_no_score(labelled):
    """`nsfw.threads` is an execution key, outside the stage's key (a resumed run may change it): every score, int8
    and fp32, is the same bit for bit at 1 and 2 threads per forward."""
    images, fp32 = labelled
    assert np.array_equal(_scores(OpenNsfw(NsfwConfig(threads=2)), images), fp32)
    one, two = (_scores(OpenNsfwInt8(NsfwConfig(threads=t)), images) for t in (1, 2))
    assert np.array_equal(one, two)


def test_auto_is_measured_and_picks_the_fastest(monkeypatch):
    monkeypatch.setattr(nsfw, "_MEASURED", {})
    monkeypatch.setattr(nsfw, "cpu_has_amx_bf16", lambda: False)
    choice, ms = measured_backend(NsfwConfig(), n=4)
    assert set(ms) == {"opennsfw", "opennsfw-int8"}
    assert choice == min(ms, key=ms.__getitem__)
    assert resolve_backend(NsfwConfig()) == choice  # cached for the process
    monkeypatch.setattr(nsfw, "_MEASURED", {f"{NsfwConfig().threads}:64": ("opennsfw", {})})
    assert resolve_backend(NsfwConfig()) == "opennsfw"
    assert resolve_backend(NsfwConfig(backend="opennsfw-int8")) == "opennsfw-int8"


def test_batched_preprocessing_is_the_reference_bit_for_bit():
    """open_nsfw_batch (one resize of the crop's box, into a reused buffer) equals open_nsfw's reference
    preprocessing (256 px resize, centre 224 crop, BGR minus the mean) exactly, at every size and mode."""
    from PIL import Image

    from curation.nsfw import open_nsfw_batch, open_nsfw_input

    photos = real_images()[:22:3]  # scikit-image photographs, 256-1024 px
    images = [p.resize(size) for p, size in zip(photos, [(256, 256), (96, 128), (160, 97), (1000, 700), (31, 300),
                                                         (224, 224), (3, 2), (511, 257)], strict=True)]  # fmt: skip
    images += [photos[0].convert("L"), photos[1].convert("P"), Image.new("RGBA", (77, 41), (9, 200, 30, 128))]
    for batch in (images, images[:3]):  # a smaller batch after a larger one reuses the buffer
        ref = np.stack([open_nsfw_input(im, jpeg_reencode=False) for im in batch])
        assert np.array_equal(open_nsfw_batch(batch, jpeg_reencode=False), ref)
    ref = np.stack([open_nsfw_input(im, jpeg_reencode=True) for im in images])
    assert np.array_equal(open_nsfw_batch(images, jpeg_reencode=True), ref)


def test_space_to_depth_stem_gives_the_same_int8_output(tmp_path):
    """The int8 stem rewritten as pad + space-to-depth + a 4x4 conv (recipe v4) computes the same integer sums as the
    quantised 7x7 stride-2 conv: outputs equal bit for bit (a small graph of open_nsfw's stem, quantised the same way)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from curation.nsfw import _session, space_to_depth_stem

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.1, (8, 3, 7, 7)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b")
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t", "w", "b"], ["c"], kernel_shape=[7, 7], strides=[2, 2], pads=[3, 3, 3, 3]),
             helper.make_node("Relu", ["c"], ["y"])]  # fmt: skip
    graph = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 38, 30, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, b])  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), tmp_path / "f.onnx")
    x = rng.normal(0, 50, (4, 38, 30, 3)).astype(np.float32)

    class Reader(CalibrationDataReader):
        feeds = iter([{"x": x}])

        def get_next(self):
            return next(self.feeds, None)

    # 7-bit weights: no CPU's int8 kernel saturates on them (on x86 without VNNI, full-range weights saturate the
    # int16 sums of VPMADDUBSW, differently for the two stems: 20 of 9,120 outputs differed on a Zen 3 VM).
    quantize_static(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QOperator,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    reduce_range=True)  # fmt: skip
    onnx.save(space_to_depth_stem(onnx.load(str(tmp_path / "q.onnx"))), tmp_path / "s2d.onnx")
    assert [n.op_type for n in onnx.load(str(tmp_path / "s2d.onnx")).graph.node].count("SpaceToDepth") == 1
    ref, = _session(tmp_path / "q.onnx", 1).run(None, {"x": x})
    out, = _session(tmp_path / "s2d.onnx", 1).run(None, {"x": x})
    assert ref.shape == (4, 8, 19, 15) and np.array_equal(out, ref) and ref.std() > 0


def test_a_batch_in_flight_holds_no_more_than_the_stage_sizes_its_threads_by():
    """The NSFW stage starts no more batches at once than the run's memory holds (flows.stages.memory_width), at
    `BATCH_BYTES_PER_IMAGE` each: measured here, two int8 batches of 64 scored at once in a fresh process, each adds
    less (5.3 MiB per image on the 2-core EPYC VM; sized at 6)."""
    from bench.nsfw import batch_memory
    from curation.nsfw import BATCH_BYTES_PER_IMAGE

    per_image = batch_memory("opennsfw-int8", 64, 2) / 64
    assert 2 * 2**20 < per_image <= BATCH_BYTES_PER_IMAGE["opennsfw-int8"], per_image / 2**20
