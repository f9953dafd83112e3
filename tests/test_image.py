"""The image front end: uint8 decoding + normalisation reproduce open_clip's eval preprocess."""

import numpy as np
import pytest
import torch

from biovita.data.synth import make_taxonomy
from biovita.data.synth_media import image_bytes, synth_image
from biovita.errors import MediaError
from biovita.frontends.image import ImageFrontEnd, load_image, normalize, preprocess, read_image


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
def test_uint8_pixels_normalised_equal_open_clip_preprocess(fmt, resize_mode):
    fe = ImageFrontEnd(image_size=96, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
                       resize_mode=resize_mode)
    rng = np.random.default_rng(3)
    data = image_bytes(synth_image(make_taxonomy(4, 0)[1], rng), fmt)
    px = load_image(data, fe, 10**8)
    assert px.dtype == np.uint8 and px.shape == (3, 96, 96) and px.flags.c_contiguous
    ref = preprocess(fe)(read_image(data, 10**8))
    assert torch.equal(normalize(torch.from_numpy(px), fe), ref)  # bit for bit
    assert torch.equal(normalize(torch.from_numpy(px)[None], fe)[0], ref)  # batched


def test_model_normalises_uint8_pixels(tiny_model):
    fe = tiny_model.image_front_end
    px = torch.randint(0, 256, (2, 3, fe.image_size, fe.image_size), dtype=torch.uint8)
    with torch.no_grad():
        a = tiny_model.encode_image(px)
        b = tiny_model.encode_image(normalize(px, fe))
        c = tiny_model.encode_image(px.float())  # floats are taken as already normalised
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c, atol=1e-3)


def test_pixel_limit_checked_before_decoding():
    data = image_bytes(synth_image(make_taxonomy(4, 0)[0], np.random.default_rng(0)), "png")
    with pytest.raises(MediaError) as e:
        load_image(data, ImageFrontEnd(64), max_pixels=1000)
    assert e.value.reason == "too_large"
