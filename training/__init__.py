"""DINOv2 self-supervised pretraining (PyTorch + Lightning), faithful to facebookresearch/dinov2.

Entry points:
- `training.pretrain.pretrain(data, out_dir, cfg)`: train or resume a run on corpus shards / an image folder
  (also `python -m training.pretrain`); `load_backbone(path)` and `build_backbone(arch, ...)` for evaluation.
- `training.recipes.DEMO`: the CPU demo overlay; `python -m training.demo_check` verifies it on MNIST.

Layout: `layers/` (attention with packed block-diagonal groups, mlp, swiglu_ffn, layer_scale, drop_path,
patch_embed, block, dino_head), `vision_transformer.py` + `registry.py` (the ViT family), `losses/` (DINO,
iBOT, KoLeo, Sinkhorn-Knopp, softmax centering), `data/` (sources, multi-crop, batched photometric ops, masking,
collate, deterministic stream), `schedules.py`, `param_groups.py`, `meta_arch.py` (framework-free SSL
student/teacher), `module.py` (thin LightningModule + DataModule), `callbacks.py`, `fsdp.py` / `strategy.py`,
`checkpoint.py` / `weights.py` (official format and every official checkpoint layout, safetensors, weights-only
loads), `export/` (transformers, timm, official `.pth`, model card), `metrics.py`.
"""
