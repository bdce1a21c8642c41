"""The dual-label simulator: determinism, chunk independence, laziness, drift, and calibration to the paper."""

from __future__ import annotations

import functools

import dask
import numpy as np
import pytest
from scipy import ndimage
from skimage.filters import window
from skimage.registration import phase_cross_correlation

from l2l_scale.synthetic import image as synthetic
from l2l_scale.errors import ConfigError
from l2l_scale.preprocess.contrast import label_contrast
from l2l_scale.synthetic import STRUCTURES, channel_names, simulate
from l2l_scale.synthetic.calibration import _foreground_psnr
from l2l_scale.synthetic.render import _render_block

L2L = ["actin", "tubulin", "adhesions", "caveolae"]


def test_channel_names_and_order():
    assert channel_names("actin") == ["AC-15", "phalloidin", "truth"]
    assert channel_names("actin", n2n=True) == ["AC-15", "phalloidin", "AC-15-repeat", "truth"]
    assert channel_names("tubulin") == ["DM1A", "YOL1/34", "truth"]
    assert channel_names("adhesions") == ["5H11", "Y113", "truth"]
    assert channel_names("caveolae", True) == ["D1P6W", "4H312", "D1P6W-repeat", "truth"]
    assert channel_names("nuclei-membrane") == ["superposed", "SYTOX", "CD44", "truth-SYTOX", "truth-CD44"]
    assert set(STRUCTURES) == {"actin", "tubulin", "adhesions", "caveolae", "nuclei-membrane"}


def test_metadata_and_pixel_sizes():
    a = simulate("tubulin", (200, 300), seed=1, chunks=128)
    assert a.dims == ("c", "y", "x") and a.shape == (3, 200, 300) and a.dtype == np.uint16
    assert a.data.chunks == ((1, 1, 1), (128, 72), (128, 128, 44))
    assert list(a.coords["c"].values) == ["DM1A", "YOL1/34", "truth"]
    assert a.attrs["pixel_size"] == (0.045, 0.045) and a.attrs["unit"] == "micrometer"
    np.testing.assert_allclose(a.coords["x"].values, np.arange(300) * 0.045)
    meta = a.attrs["l2l_synthetic"]
    assert meta["structure"] == "tubulin" and meta["input"] == "DM1A" and meta["target"] == "YOL1/34"
    assert meta["seed"] == 1 and meta["size"] == [200, 300] and meta["pixel_size_nm"] == 45.0
    assert simulate("caveolae", 64).attrs["pixel_size"] == (0.01, 0.01)  # STED, 10 nm
    assert simulate("nuclei-membrane", 64).attrs["l2l_synthetic"]["target"] == ["SYTOX", "CD44"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(structure="microtubules"), "actin, tubulin, adhesions, caveolae, nuclei-membrane"),
        (dict(size=8), "below 16"),
        (dict(chunks=8), "below 16"),
        (dict(drift=(1.0, 0.0)), "add --n2n"),
        (dict(structure="nuclei-membrane", n2n=True), "drop --n2n"),
        (dict(size=2.5), "not an integer"),
    ],
)
def test_user_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        simulate(**kwargs)


@pytest.mark.parametrize("structure", ["actin", "tubulin", "caveolae", "nuclei-membrane"])
def test_small_images_show_structure(structure):
    """The cell of tile (0, 0) covers the origin: a few hundred pixels are enough to see the structure."""
    truth = simulate(structure, 256, seed=1).values[-1]
    assert (truth > 0).mean() > (0.002 if structure == "caveolae" else 0.02)


def test_same_seed_same_pixels_other_seed_other_pixels():
    a = simulate("adhesions", 256, seed=7, chunks=128).values
    b = simulate("adhesions", 256, seed=7, chunks=128).values
    c = simulate("adhesions", 256, seed=8, chunks=128).values
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])


@pytest.mark.parametrize(
    "structure, offset, kwargs",
    [
        ("tubulin", 0, dict(n2n=True, drift=(2.3, -1.7))),
        ("actin", 0, dict(n2n=True)),
        ("caveolae", 0, dict(n2n=True, drift=(-0.6, 4.2))),
        ("nuclei-membrane", 0, {}),
        ("adhesions", 1650, {}),  # away from the origin, between cells
    ],
)
def test_chunked_generation_equals_one_piece(structure, offset, kwargs):
    """A 300 x 300 region rendered as one block equals the same region assembled from chunks of 96 and 77 px
    (other halos, noise tiles straddling chunk borders, other sets of cell tiles)."""
    n2n, drift = kwargs.get("n2n", False), kwargs.get("drift", (0.0, 0.0))
    loc = [(0, len(channel_names(structure, n2n))), (offset, offset + 300), (offset, offset + 300)]
    whole = _render_block(structure, 3, n2n, drift, block_info={None: {"array-location": loc}})
    assert whole[-1].max() > 0, "no structure in the test region"
    for chunks in (96, 77):
        part = simulate(structure, offset + 300, seed=3, chunks=chunks, **kwargs)[:, offset:, offset:].values
        np.testing.assert_array_equal(part, whole)
    if offset == 0:  # and the whole image in one chunk
        np.testing.assert_array_equal(simulate(structure, 300, seed=3, chunks=300, **kwargs).values, whole)


def test_graph_is_lazy_and_one_chunk_computes_alone(monkeypatch):
    regions = []

    def _spy(*args, block_info=None, **kwargs):
        regions.append(tuple(block_info[None]["chunk-location"]))
        return _render_block(*args, block_info=block_info, **kwargs)

    monkeypatch.setattr(synthetic, "_render_block", _spy)
    arr = simulate("caveolae", 30000, seed=0, chunks=1024)  # 5.4 GB if it were materialised
    assert arr.shape == (3, 30000, 30000) and arr.data.chunksize == (1, 1024, 1024)
    assert arr.data.npartitions == 3 * 30 * 30 and regions == []
    with dask.config.set(scheduler="synchronous"):
        out = arr.data.blocks[0, 5, 7].compute()
    assert out.shape == (1, 1024, 1024) and out.dtype == np.uint16
    assert regions == [(0, 5, 7)], "computing one chunk must render that region only"
    # The block equals the same region cut from a smaller image (another graph, other neighbours).
    ref = simulate("caveolae", (6 * 1024, 8 * 1024), seed=0, chunks=1024).data.blocks[0, 5, 7].compute()
    np.testing.assert_array_equal(out, ref)


def test_one_render_task_per_region_for_all_channels():
    arr = simulate("actin", 512, seed=0, chunks=256, n2n=True)
    graph = dict(arr.data.__dask_graph__())
    renders = [k for k in graph if isinstance(k, tuple) and str(k[0]).startswith("l2l-simulate")]
    assert len(renders) == 4  # 2 x 2 regions, each rendering its 4 channels once


def test_truth_and_labels_relate_like_l2l():
    """Target tracks the truth better than the input; the truth has no background; the repeat is the input's
    expectation with fresh noise."""
    inp, tgt, rep, truth = simulate("actin", 1024, seed=2, n2n=True).values.astype(float)
    assert truth.min() == 0 and (truth == 0).mean() > 0.5
    c_tgt = np.corrcoef(tgt.ravel(), truth.ravel())[0, 1]
    c_inp = np.corrcoef(inp.ravel(), truth.ravel())[0, 1]
    assert c_tgt > 0.9 and c_inp < c_tgt - 0.2, (c_tgt, c_inp)
    assert not np.array_equal(inp, rep)
    # same expectation: smoothed difference is pure noise (tiny relative to the signal, uncorrelated)
    d = ndimage.uniform_filter(inp - rep, 32)
    assert np.abs(d).max() < 0.05 * (np.percentile(inp, 99) - np.percentile(inp, 1))


@functools.lru_cache(maxsize=None)
def _field(structure: str) -> np.ndarray:
    """One 2048^2 field (4096^2 for the 10 nm STED caveolae: 2048 px is only 20 um), shared by the tests."""
    return simulate(structure, 4096 if structure == "caveolae" else 2048, seed=0).values


@pytest.mark.parametrize("structure", L2L)
def test_input_has_lower_contrast_than_target(structure):
    spec = STRUCTURES[structure]
    a = _field(structure)
    kw = dict(top_fraction=spec.contrast_fraction, percentiles=spec.contrast_percentiles)
    m_in, r_in = label_contrast(a[0], **kw)
    m_tg, r_tg = label_contrast(a[1], **kw)
    assert m_in < m_tg - 0.2 and r_in < r_tg, (m_in, m_tg, r_in, r_tg)


def test_drift_is_recovered_by_phase_correlation():
    """repeat(y, x) = input(y - dy, x - dx): registering the repeat onto the input needs the shift -drift."""
    drift = (2.3, -1.7)
    a = simulate("tubulin", 768, seed=0, n2n=True, drift=drift).values.astype(float)
    w = window("hann", a[0].shape)  # the image frame does not move; the window keeps it out of the estimate
    shift = phase_cross_correlation(a[0] * w, a[2] * w, upsample_factor=20, normalization=None)[0]
    np.testing.assert_allclose(shift, [-drift[0], -drift[1]], atol=0.2)
    # no drift: the repeat sits on the input
    b = simulate("tubulin", 768, seed=0, n2n=True).values.astype(float)
    shift0 = phase_cross_correlation(b[0] * w, b[2] * w, upsample_factor=20, normalization=None)[0]
    np.testing.assert_allclose(shift0, [0.0, 0.0], atol=0.2)


def test_drift_shifts_the_geometry_exactly():
    """With an integer drift the noise-free repeat is the input moved by exactly that many pixels."""
    spec = STRUCTURES["tubulin"]
    from l2l_scale.synthetic.render import _expected
    from l2l_scale.synthetic.tiles import _tiles_for

    oy = ox = 0
    tiles = _tiles_for(spec, 0, oy - 40, oy + 340, ox - 40, ox + 340)
    e0 = _expected(spec, tiles, oy, ox, (300, 300))["input"]
    e1 = _expected(spec, tiles, oy, ox, (300, 300), (3.0, -2.0), which=("input",))["input"]
    assert e0.std() > 1
    np.testing.assert_allclose(e1[20:-20, 20:-20], e0[17:-23, 22:-18], rtol=1e-12, atol=1e-9)


# Paper (Kölln et al. 2022): Michelson / RMS contrast of input / target (mean +- s.d.) and raw input-vs-target
# PSNR (Table 1). Tolerances are 2 s.d. (PSNR: +-2 dB). The clipped-sample RMS of the target is not tested
# against the paper: for line-like structures it is ~0.3 by construction (see l2l_scale.synthetic).
PAPER = {
    "actin": dict(michelson=((0.44, 0.08), (0.96, 0.04)), rms_in=(0.15, 0.03), psnr=16.67),
    "tubulin": dict(michelson=((0.45, 0.14), (0.90, 0.05)), rms_in=None, psnr=17.20),
    "adhesions": dict(michelson=((0.57, 0.07), (0.99, 0.01)), rms_in=None, psnr=18.73),
}


@pytest.mark.parametrize("structure", ["actin", "tubulin", "adhesions"])
def test_calibration_matches_the_paper(structure):
    spec = STRUCTURES[structure]
    a = _field(structure)
    kw = dict(top_fraction=spec.contrast_fraction, percentiles=spec.contrast_percentiles)
    (m_in, r_in), (m_tg, r_tg) = label_contrast(a[0], **kw), label_contrast(a[1], **kw)
    ref = PAPER[structure]
    (mi, si), (mt, st) = ref["michelson"]
    assert abs(m_in - mi) <= 2 * si, (m_in, mi, si)
    assert abs(m_tg - mt) <= 2 * st + 1e-9 or m_tg >= mt, (m_tg, mt, st)
    if ref["rms_in"]:
        assert abs(r_in - ref["rms_in"][0]) <= 2 * ref["rms_in"][1], r_in
    assert r_tg > r_in
    psnr = _foreground_psnr(a[0], a[1], spec.percentiles)
    assert abs(psnr - ref["psnr"]) <= 2.0, psnr


def test_render_block_is_a_plain_function_of_its_region():
    """The task function depends only on (structure, seed, n2n, drift, region): a worker can compute any block."""
    info = {None: {"array-location": [(0, 3), (100, 164), (40, 104)]}}
    a = _render_block("adhesions", 5, False, (0.0, 0.0), block_info=info)
    whole = simulate("adhesions", 200, seed=5, chunks=200).values[:, 100:164, 40:104]
    np.testing.assert_array_equal(a, whole)
