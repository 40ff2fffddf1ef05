"""SIM model: shapes, sequence lengths, gradients, target copy, pixel target, presets, ZeRO-3 rule."""
import copy

import pytest
import timm
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from simscale.config import build_config
from simscale.model.sim import SIM, build_sim


def tiny(*overrides):
    return build_config("tiny", overrides=list(overrides))


def batch(cfg, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = cfg.model
    grid = m.img_size // m.patch_size
    n = grid * grid
    masked = round(cfg.data.mask.ratio * n)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        mask[i, torch.randperm(n, generator=g)[:masked]] = True
    geometry = torch.tensor([[0.1, -0.2, 0.9, 1.2, 0.0, 0.7], [0.0, 0.0, 1.0, 1.0, 0.0, 1.0],
                             [-0.3, 0.2, 1.4, 0.8, 1.0, 1.1]])[:b]
    a = torch.randn(b, 3, m.img_size, m.img_size, generator=g)
    v = torch.randn(b, 3, m.img_size, m.img_size, generator=g)
    return a, v, geometry, mask


def test_output_shapes_and_dtypes():
    cfg = tiny()
    model = SIM(cfg)
    out = model(*batch(cfg))
    assert out["pred"].shape == (3, 16, cfg.model.decoder_dim)
    assert out["target"].shape == (3, 16, cfg.model.decoder_dim)
    assert out["pred"].requires_grad and not out["target"].requires_grad
    loss, stats = model.loss(out)
    assert loss.ndim == 0 and torch.isfinite(loss) and "loss" in stats


def test_target_is_layernormed_without_affine():
    cfg = tiny()
    out = SIM(cfg)(*batch(cfg))
    t = out["target"]
    torch.testing.assert_close(t.mean(-1), torch.zeros(t.shape[:-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1, unbiased=False), torch.ones(t.shape[:-1]), atol=1e-3, rtol=0)


def test_sequence_lengths_encoder_one_plus_visible_decoder_one_plus_visible_plus_all():
    cfg = tiny()
    model = SIM(cfg)
    a, v, geometry, mask = batch(cfg)
    seen = {}
    hooks = [
        model.online.encoder.blocks[0].register_forward_pre_hook(lambda m, i: seen.__setitem__("enc", i[0].shape[1])),
        model.online.projector.blocks[0].register_forward_pre_hook(lambda m, i: seen.__setitem__("proj", i[0].shape[1])),
        model.predictor.blocks[0].register_forward_pre_hook(lambda m, i: seen.__setitem__("pred", i[0].shape[1])),
        model.target.encoder.blocks[0].register_forward_pre_hook(lambda m, i: seen.__setitem__("tgt", i[0].shape[1])),
    ]
    model(a, v, geometry, mask)
    for h in hooks:
        h.remove()
    n = mask.shape[1]
    visible = n - int(mask[0].sum())
    assert seen == {"enc": 1 + visible, "proj": 1 + visible, "pred": 1 + visible + n, "tgt": 1 + n}


def test_unequal_mask_counts_are_refused():
    cfg = tiny()
    a, v, geometry, mask = batch(cfg)
    mask[0, (~mask[0]).nonzero()[0]] = True
    with pytest.raises(ValueError, match="same number"):
        SIM(cfg)(a, v, geometry, mask)


def test_gradients_reach_every_online_trainable_and_nothing_else():
    cfg = tiny()
    model = SIM(cfg)
    loss, _ = model.loss(model(*batch(cfg)))
    loss.backward()
    trainable = {id(p) for p in model.online_parameters()}
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    frozen = {n for n, p in model.named_parameters() if id(p) not in trainable}
    assert {n for n in frozen if not n.startswith("target.")} == {
        "online.encoder.patch_embed.proj.weight", "online.encoder.patch_embed.proj.bias"}
    assert all(not p.requires_grad for p in model.target.parameters())
    names = {n for n, _ in model.named_parameters()}
    assert not any("pos_embed" in n for n in names)  # PE tables are buffers, not parameters
    assert not any("pos_embed" in k for k in model.state_dict())  # and not saved (recomputed)


def test_target_starts_as_exact_copy_and_ema_pairs_line_up():
    model = SIM(tiny())
    pairs = model.ema_pairs()
    assert [n for n, _, _ in pairs] == [n for n, _, _ in model.ema_pairs()]
    assert [n for n, _ in model.online.named_parameters()] == [n for n, _, _ in pairs]
    for name, po, pt in pairs:
        assert po is not pt and po.shape == pt.shape and torch.equal(po, pt), name
        assert not pt.requires_grad
    online_ids = {id(p) for p in model.online_parameters()}
    assert not any(id(pt) in online_ids for _, _, pt in pairs)


@pytest.mark.parametrize("norm", ["bn", "ln"])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(norm):
    cfg = tiny(f"model.decoder_norm={norm}")
    torch.manual_seed(0)
    plain = SIM(cfg)
    ckpt = copy.deepcopy(plain)
    ckpt.online.encoder.grad_checkpointing = True
    data = batch(cfg)
    results = []
    for model in (plain, ckpt):
        loss, _ = model.loss(model(*data))
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.online_parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for g0, g1 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g0, g1, atol=1e-6, rtol=1e-5)


def test_config_switches_checkpointing_and_norm_layers():
    model = SIM(tiny("model.grad_checkpointing=true", "model.decoder_norm=ln"))
    assert model.online.encoder.grad_checkpointing and not model.target.encoder.grad_checkpointing
    assert not any(type(m).__name__ == "TokenBatchNorm" for m in model.modules())
    model = SIM(tiny())
    assert isinstance(model.predictor.blocks[0].norm1, nn.Module)
    assert type(model.predictor.blocks[0].norm1).__name__ == "TokenBatchNorm"


def test_pixel_target_has_no_target_encoder():
    cfg = tiny("model.target=pixel")
    model = build_sim(cfg)
    assert model.target is None and model.ema_pairs() == []
    a, v, geometry, mask = batch(cfg)
    out = model(a, v, geometry, mask)
    p = cfg.model.patch_size
    assert out["pred"].shape == out["target"].shape == (3, 16, p * p * 3)
    # target = view B patch (r, c) pixels (p, p, 3), normalised per patch
    patch = v[1, :, 8:16, 0:8].permute(1, 2, 0).reshape(-1)
    want = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()
    torch.testing.assert_close(out["target"][1, 4], want, atol=1e-5, rtol=1e-5)
    loss, _ = model.loss(out)
    loss.backward()
    assert all(p.grad is not None for p in model.online_parameters())


# --- presets -------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["vit_l16", "vit_h14", "vit_g14"])
def test_large_presets_match_timm_encoder_shapes_on_meta(preset):
    cfg = build_config(preset)
    with torch.device("meta"):
        model = SIM(cfg)
        ref = timm.create_model(cfg.model.arch, pretrained=False, num_classes=0)
    ours = dict(model.encoder.named_parameters())
    theirs = {n: p for n, p in ref.named_parameters() if n != "pos_embed" and not n.startswith("norm.")}
    assert {n: tuple(p.shape) for n, p in ours.items()} == {n: tuple(p.shape) for n, p in theirs.items()}
    assert sum(p.numel() for p in ours.values()) == sum(p.numel() for p in theirs.values())
    assert tuple(model.encoder.pos_embed.shape) == tuple(ref.pos_embed.shape)  # timm layout, zero cls row
    assert [n for n, _, _ in model.ema_pairs()] == [n for n, _ in model.online.named_parameters()]


def test_tiny_preset_loads_into_timm_model_of_its_shape():
    cfg = tiny("model.final_norm=true")
    model = SIM(cfg)
    m = cfg.model
    ref = timm.create_model(m.arch, pretrained=False, num_classes=0, img_size=m.img_size, patch_size=m.patch_size,
                            embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads)
    state = dict(model.encoder.state_dict())
    state["pos_embed"] = model.encoder.pos_embed.clone()
    ref.load_state_dict(state, strict=True)
    ref.eval()
    model.eval()
    x = torch.randn(2, 3, m.img_size, m.img_size)
    torch.testing.assert_close(ref.forward_features(x), model.encoder(x), atol=1e-5, rtol=1e-5)


# --- ZeRO-3 rule: a parameter is only read while its own module's forward runs ----------------

class _ParameterUseChecker(TorchFunctionMode):
    def __init__(self, model):
        super().__init__()
        self.owner = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
        self.active: list[nn.Module] = []
        self.violations: set[str] = set()
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.hooks = []
        for m in model.modules():
            self.hooks.append(m.register_forward_pre_hook(self._enter))
            self.hooks.append(m.register_forward_hook(self._leave))

    def _enter(self, module, inputs):
        self.active.append(module)

    def _leave(self, module, inputs, output):
        self.active.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for a in list(args) + list(kwargs.values()):
            for t in a if isinstance(a, (list, tuple)) else (a,):
                if isinstance(t, nn.Parameter) and id(t) in self.owner:
                    if not self.active or self.active[-1] is not self.owner[id(t)]:
                        self.violations.add(self.names[id(t)])
        return func(*args, **kwargs)


def test_parameters_are_only_read_inside_their_own_module_forward():
    cfg = tiny("model.grad_checkpointing=true")
    model = SIM(cfg)
    checker = _ParameterUseChecker(model)
    with checker:
        loss, _ = model.loss(model(*batch(cfg)))
        loss.backward()
    for h in checker.hooks:
        h.remove()
    assert checker.violations == set()
    # and the checker does catch a violation
    with checker:
        model.online.encoder.cls_token * 2
    assert "online.encoder.cls_token" in checker.violations


def test_visible_indices_keep_raster_order_of_unmasked_patches():
    from simscale.model.encoder import visible_indices

    cfg = tiny()
    mask = batch(cfg)[3]
    ids = visible_indices(mask)
    for row in range(mask.shape[0]):
        assert ids[row].tolist() == (~mask[row]).nonzero().flatten().tolist()


def test_masked_encoder_sees_only_visible_patches():
    """Changing masked pixels of view A must not change the predictions."""
    cfg = tiny()
    model = SIM(cfg).eval()
    a, v, geometry, mask = batch(cfg)
    out1 = model(a, v, geometry, mask)["pred"]
    a2 = a.clone()
    grid, p = 4, cfg.model.patch_size
    for b in range(a.shape[0]):
        for idx in mask[b].nonzero().flatten().tolist():
            r, c = divmod(idx, grid)
            a2[b, :, r * p : (r + 1) * p, c * p : (c + 1) * p] = torch.randn(3, p, p)
    torch.testing.assert_close(model(a2, v, geometry, mask)["pred"], out1)
    a2[0, :, :p, :p] += 1.0  # a visible patch (the first one, unless masked) does change them
    if not mask[0, 0]:
        assert not torch.allclose(model(a2, v, geometry, mask)["pred"], out1)


@pytest.mark.parametrize("mode", ["autocast", "bf16_weights"])
def test_bf16_runs_and_loss_is_float32(mode):
    cfg = tiny()
    model = SIM(cfg)
    a, v, geometry, mask = batch(cfg, b=2)
    if mode == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(a, v, geometry, mask)
            loss, _ = model.loss(out)
        assert out["pred"].dtype == torch.bfloat16
    else:  # what a bf16 DeepSpeed engine does: weights and images in bf16, geometry in fp32
        model = model.to(torch.bfloat16)
        out = model(a.bfloat16(), v.bfloat16(), geometry, mask)
        loss, _ = model.loss(out)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
