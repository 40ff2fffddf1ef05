"""Batched device photometrics vs a per-image torchvision reference with the same parameters."""
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

import images
from simscale.data import photometric as ph
from simscale.data.photometric import apply_photometric, blur_kernel_size, draw_params


def real_batch(n, size=48):
    views = [np.asarray(images.variant(k, (size, size))) for k in range(n)]
    return torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).contiguous()


def reference(img_u8, p):
    """One image through torchvision.transforms.functional, in the documented order."""
    x = img_u8.float() / 255
    if p[ph.JITTER] > 0.5:
        ops = [lambda y: TF.adjust_brightness(y, float(p[ph.BRIGHT])),
               lambda y: TF.adjust_contrast(y, float(p[ph.CONTRAST])),
               lambda y: TF.adjust_saturation(y, float(p[ph.SAT])),
               lambda y: TF.adjust_hue(y, float(p[ph.HUE]))]
        for k in p[ph.ORDER:ph.ORDER + 4].round().long().tolist():
            x = ops[k](x)
    if p[ph.GRAY] > 0.5:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p[ph.BLUR] > 0.5:
        k = blur_kernel_size(x.shape[-1])
        x = TF.gaussian_blur(x, [k, k], [float(p[ph.SIGMA])] * 2)
    if p[ph.SOLAR] > 0.5:
        x = TF.solarize(x, 128 / 255)
    return TF.normalize(x, ph.MEAN, ph.STD)


@pytest.mark.parametrize("view", ["a", "b"])
@pytest.mark.parametrize("chunk", [1, 5, 24])  # 1: the CPU path; larger: the accelerator path
def test_batched_equals_per_image_torchvision(view, chunk):
    n = 24
    x = real_batch(n)
    rng = np.random.default_rng(7)
    params = np.stack([draw_params(rng, view) for _ in range(n)])
    # Make sure every op is exercised at least once in the batch.
    params[:4, ph.JITTER] = 1
    params[4:8, ph.GRAY] = 1
    params[8:12, ph.BLUR] = 1
    if view == "b":
        params[12:16, ph.SOLAR] = 1
    p = torch.from_numpy(params)
    out = apply_photometric(x, p, view=view, chunk=chunk)
    assert out.dtype == torch.float32 and out.shape == x.shape
    for i in range(n):
        ref = reference(x[i], p[i])
        assert torch.allclose(out[i], ref, atol=2e-4), (i, (out[i] - ref).abs().max())


def test_close_to_pil_pipeline_for_pil_ops():
    # Against PIL's uint8 ops (brightness/contrast/saturation/grayscale/solarize), rounding aside.
    from PIL import ImageOps
    x = real_batch(8)
    rng = np.random.default_rng(3)
    params = np.stack([draw_params(rng, "b") for _ in range(8)])
    params[:, ph.JITTER] = 1
    params[:, ph.HUE] = 0.0  # PIL's hue path rounds through uint8 HSV: compared via torchvision above
    params[:, ph.BLUR] = 0
    params[:4, ph.SOLAR] = 1
    params[4:, ph.GRAY] = 1
    out = apply_photometric(x, torch.from_numpy(params), view="b", normalize=False)
    for i in range(8):
        im = TF.to_pil_image(x[i])
        for k in params[i, ph.ORDER:ph.ORDER + 4].astype(int):
            if k == 0:
                im = TF.adjust_brightness(im, float(params[i, ph.BRIGHT]))
            elif k == 1:
                im = TF.adjust_contrast(im, float(params[i, ph.CONTRAST]))
            elif k == 2:
                im = TF.adjust_saturation(im, float(params[i, ph.SAT]))
        if params[i, ph.GRAY]:
            im = TF.to_grayscale(im, 3)
        if params[i, ph.SOLAR]:
            im = ImageOps.solarize(im, 128)
        ref = TF.to_tensor(im)
        assert (out[i] - ref).abs().mean() < 0.01


def test_parameter_draws_follow_the_recipe():
    rng = np.random.default_rng(0)
    n = 4000
    a = np.stack([draw_params(rng, "a") for _ in range(n)])
    b = np.stack([draw_params(rng, "b") for _ in range(n)])
    tol = 4 * np.sqrt(0.25 / n)
    for arr in (a, b):
        assert abs(arr[:, ph.JITTER].mean() - 0.8) < tol
        assert abs(arr[:, ph.GRAY].mean() - 0.2) < tol
        assert 0.6 <= arr[:, ph.BRIGHT].min() and arr[:, ph.BRIGHT].max() <= 1.4
        assert 0.6 <= arr[:, ph.CONTRAST].min() and arr[:, ph.CONTRAST].max() <= 1.4
        assert 0.8 <= arr[:, ph.SAT].min() and arr[:, ph.SAT].max() <= 1.2
        assert -0.1 <= arr[:, ph.HUE].min() and arr[:, ph.HUE].max() <= 0.1
        assert abs(arr[:, ph.HUE].mean()) < 0.005
        assert 0.1 <= arr[:, ph.SIGMA].min() and arr[:, ph.SIGMA].max() <= 2.0
        orders = arr[:, ph.ORDER:ph.ORDER + 4]
        assert (np.sort(orders, axis=1) == np.arange(4)).all()
        first = np.bincount(orders[:, 0].astype(int), minlength=4) / n  # each op first ~1/4
        assert np.abs(first - 0.25).max() < 0.04
    assert a[:, ph.BLUR].mean() == 1.0 and a[:, ph.SOLAR].sum() == 0
    assert abs(b[:, ph.BLUR].mean() - 0.1) < tol and abs(b[:, ph.SOLAR].mean() - 0.2) < tol


def test_color_aug_off_leaves_only_normalisation():
    x = real_batch(6)
    rng = np.random.default_rng(0)
    p = torch.from_numpy(np.stack([draw_params(rng, "a", color_aug=False) for _ in range(6)]))
    out = apply_photometric(x, p, view="a")
    assert torch.allclose(out, TF.normalize(x.float() / 255, ph.MEAN, ph.STD), atol=1e-6)
    with_aug = apply_photometric(x, torch.from_numpy(np.stack([draw_params(rng, "a") for _ in range(6)])))
    assert not torch.allclose(with_aug, out, atol=1e-2)


def test_blur_sigma_is_specified_at_224_px_and_scales_with_the_view():
    from simscale.data.photometric import SIGMA, sigma_range_for

    assert sigma_range_for(224) == pytest.approx((0.1, 2.0))  # the release recipe, unchanged
    lo, hi = sigma_range_for(32)
    assert lo == pytest.approx(0.1 * 32 / 224) and hi == pytest.approx(2.0 * 32 / 224)
    rng = np.random.default_rng(0)
    sigmas = [draw_params(rng, "a", True, (lo, hi))[SIGMA] for _ in range(200)]
    assert lo <= min(sigmas) and max(sigmas) <= hi


def test_the_stream_draws_blur_for_its_image_size(train_shards):
    from simscale.config import build_config
    from simscale.data.photometric import SIGMA
    from simscale.data.stream import TwoViewStream

    cfg = build_config("tiny", overrides=[f"data.train={train_shards}", "data.num_workers=0", "optim.batch_size=4"])
    batch = next(TwoViewStream(cfg).batches(epoch=0))
    assert float(batch["photo_a"][:, SIGMA].max()) <= 2.0 * 32 / 224 + 1e-6
