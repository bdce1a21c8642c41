"""The simulated dual-label datasets: channel names, pixel sizes, PSFs and the rendering parameters tuned against
the paper (the calibration is described in :mod:`l2l_scale.synthetic`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from l2l_scale.errors import ConfigError


@dataclass(frozen=True, eq=False)
class StructureSpec:
    """One simulated dual-label dataset.

    Attributes
    ----------
    name : str
        Key in :data:`STRUCTURES`.
    input : str
        Channel name of the input-like (lower contrast) label.
    targets : tuple of str
        Channel name(s) of the target-like label(s); two for the separation task.
    pixel_size_nm : float
        Pixel size in nanometres (square pixels).
    modality : str
        ``"confocal"`` or ``"STED"``.
    psf_fwhm_nm : (float, float)
        Lateral PSF FWHM of the input and the target label.
    cell_pitch_um : float
        Pitch of the jittered cell grid (one cell per tile).
    contrast_fraction : float
        Brightest fraction used as the contrast sample (paper: 0.10, 0.01 for STED caveolae).
    percentiles : (float, float)
        Normalisation percentiles of the paper's Table 2 for this dataset.
    contrast_percentiles : (float, float)
        Percentiles for :func:`~l2l_scale.preprocess.contrast.label_contrast` (paper: 1/99; the caveolae use
        their Table 2 percentiles 2/99.5 because a clipped 1 % sample needs a high percentile above 99).
    description : str
        What is simulated.
    params : dict
        Rendering parameters (photon levels, densities, modulation strengths), listed above :data:`STRUCTURES`.
    """

    name: str
    input: str
    targets: tuple[str, ...]
    pixel_size_nm: float
    modality: str
    psf_fwhm_nm: tuple[float, float]
    cell_pitch_um: float
    contrast_fraction: float
    percentiles: tuple[float, float]
    description: str
    params: dict = field(default_factory=dict)
    contrast_percentiles: tuple[float, float] = (1.0, 99.0)

    @property
    def truths(self) -> tuple[str, ...]:
        """Ground-truth channel names (``truth``, or ``truth-<target>`` when there are several targets)."""
        return ("truth",) if len(self.targets) == 1 else tuple(f"truth-{t}" for t in self.targets)

    @property
    def pixel_size_um(self) -> float:
        """Pixel size in micrometres."""
        return self.pixel_size_nm / 1000.0

    def psf_sigma_px(self) -> tuple[float, float]:
        """Gaussian PSF sigma (px) of the input and the target label."""
        f = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)) * self.pixel_size_nm)
        return self.psf_fwhm_nm[0] * f, self.psf_fwhm_nm[1] * f


# Rendering parameters (``StructureSpec.params``), tuned against the paper (module docstring):
#   cell_radius_um  range of the cell's long semi-axis (the short one is 0.6-0.95 of it); fill: P(tile has a cell)
#   count           primitives per cell (fibres, microtubules, plaques), or caveolae per um^2 of cell
#   tg_peak/in_peak expected photons at the centre of a typical element (one fibre, microtubule, plaque or
#                   caveola) after the label's PSF; tg_bg/in_bg: cytosolic photons inside the cell; in_nuc: the
#                   input's background over the nucleus, relative
#   tg_mod/in_mod   log-s.d. of the label's smooth intensity modulation along the structure (2-6 um scale)
#   punct_density   unspecific puncta of the input label per um^2 of cell; punct_peak: their photons
#   dark, adu, offset_adu, read_adu   photons/px everywhere, grey values per photon, detector offset, read noise
#   truth_gain      grey values of the truth per unit structure (a typical element peaks near 1)
#   nuclei-membrane: sytox_peak, nuc_texture (chromatin), cd44_peak, cd44_bg (apical membrane over the cell),
#                   sup_sytox / sup_cd44 (weights of both markers in the superposed acquisition)
_COMMON = dict(dark=0.3, adu=16.0, offset_adu=100.0, read_adu=6.0, truth_gain=1000.0, fill=0.9)

def _confocal(name: str, input: str, target: str, psf_fwhm_nm: tuple[float, float], cell_pitch_um: float,
              description: str, **params: Any) -> StructureSpec:
    """A structure imaged like the paper's 63x/1.4 NA confocal pairs: 45 nm pixels (4096^2 fields), 1/99.9
    training percentiles, the brightest 10 % of pixels as the contrast sample."""
    return StructureSpec(name=name, input=input, targets=(target,), pixel_size_nm=45.0, modality="confocal",
                         psf_fwhm_nm=psf_fwhm_nm, cell_pitch_um=cell_pitch_um, contrast_fraction=0.10,
                         percentiles=(1.0, 99.9), description=description, params=dict(_COMMON, **params))


STRUCTURES: dict[str, StructureSpec] = {
    "actin": _confocal(
        "actin", "AC-15", "phalloidin", (230.0, 220.0), 52.0,
        "HeLa actin: curved stress fibres and bundles, cortical ring, short meshwork filaments",
        cell_radius_um=(11.0, 16.0), count=(10, 22), tg_peak=60.0, tg_bg=0.2, tg_mod=0.1, in_peak=15.0, in_bg=8.5,
        in_nuc=0.4, in_mod=0.4, punct_density=0.3, punct_peak=30.0),
    "tubulin": _confocal(
        "tubulin", "DM1A", "YOL1/34", (235.0, 225.0), 60.0,
        "MeT5A microtubules: curved filaments radiating from a centrosome next to the nucleus",
        cell_radius_um=(13.0, 17.0), count=(40, 75), tg_peak=40.0, tg_bg=0.2, tg_mod=0.1, in_peak=16.0, in_bg=9.0,
        in_nuc=0.5, in_mod=0.1, punct_density=0.2, punct_peak=22.0),
    "adhesions": _confocal(
        "adhesions", "5H11", "Y113", (235.0, 225.0), 40.0,
        "paxillin: elongated focal-adhesion plaques at the cell edge, oriented radially",
        cell_radius_um=(13.0, 17.0), count=(30, 60), tg_peak=30.0, tg_bg=0.01, tg_mod=0.1, in_peak=7.0, in_bg=1.5,
        in_nuc=0.7, in_mod=0.8, punct_density=0.3, punct_peak=8.0, dark=0.03, read_adu=1.5),
    "caveolae": StructureSpec(
        name="caveolae", input="D1P6W", targets=("4H312",), pixel_size_nm=10.0, modality="STED",
        psf_fwhm_nm=(75.0, 70.0), cell_pitch_um=50.0, contrast_fraction=0.01, percentiles=(2.0, 99.5),
        description="caveolae: 60-100 nm puncta over the cell area, STED",
        params=dict(_COMMON, cell_radius_um=(20.0, 28.0), count=0.45, tg_peak=15.0, tg_bg=0.0, tg_mod=0.3,
                    in_peak=12.0, in_bg=1.0, in_nuc=1.0, in_mod=0.8, punct_density=1.0, punct_peak=12.0,
                    dark=0.01, read_adu=1.0),
        contrast_percentiles=(2.0, 99.5),
    ),
    "nuclei-membrane": StructureSpec(
        name="nuclei-membrane", input="superposed", targets=("SYTOX", "CD44"), pixel_size_nm=70.8,
        modality="confocal", psf_fwhm_nm=(220.0, 220.0), cell_pitch_um=40.0, contrast_fraction=0.10,
        percentiles=(2.0, 99.8),
        description="separation: filled nuclei (SYTOX) and plasma-membrane outline (CD44), input is their sum",
        params=dict(_COMMON, cell_radius_um=(13.0, 17.0), count=None, sytox_peak=40.0, nuc_texture=0.25,
                    cd44_peak=30.0, cd44_bg=10.0, sup_sytox=0.4, sup_cd44=1.0),
    ),
}


def _spec(structure: str) -> StructureSpec:
    try:
        return STRUCTURES[structure]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown structure {structure!r}; use one of: {', '.join(STRUCTURES)}"
        ) from None


def channel_names(structure: str, n2n: bool = False) -> list[str]:
    """Channel names of :func:`simulate`, in order.

    Input-like label first, then the target-like label(s), then ``<input>-repeat`` when ``n2n``, then the
    ground truth last (``truth``; ``truth-SYTOX``, ``truth-CD44`` for ``nuclei-membrane``).

    Raises
    ------
    ConfigError
        Unknown structure, or ``n2n`` for the separation task.
    """
    spec = _spec(structure)
    if n2n and len(spec.targets) > 1:
        raise ConfigError(f"structure {structure!r} has no Noise2Noise repeat; drop --n2n")
    names = [spec.input, *spec.targets]
    if n2n:
        names.append(f"{spec.input}-repeat")
    return names + list(spec.truths)
