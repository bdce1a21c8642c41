"""Drift correction: estimate the translation between sequential acquisitions, apply it lazily, crop.

Label2label pairs are often acquired sequentially (one label after the other, or a Noise2Noise repeat), so the
stage may drift between them. ``l2l-scale register`` estimates one translation per moving channel and field,
applies it as a Dask graph and crops every channel to their common region (Kölln et al. 2022, Methods "Image
drift correction").

Sign convention
---------------
A shift ``(dy, dx)`` is what is *applied to the moving channel* to register it onto the reference (the
convention of :func:`skimage.registration.phase_cross_correlation` and :func:`scipy.ndimage.shift`):
``registered(y, x) = moving(y - dy, x - dx)``. Content that sits at ``p`` in the reference and at ``p + d`` in
the moving channel (a stage drift ``d``) gives the shift ``-d``; :func:`l2l_scale.synthetic.simulate` with
``drift=d`` is registered by ``-d``.

Estimation reads a coarse pyramid level and a sample of patches, never the whole image
------------------------------------------------------------------------------------
1. *Coarse guess.* The finest pyramid level whose larger side is at most ``COARSE_MAX`` px (a central crop of
   that size when the image has no such level) is read for both channels, and their cross-correlation gives a
   first estimate that may be large (up to about a quarter of the coarse image; the images are tapered with a
   Tukey window, which unlike a Hann window keeps structure near the edges). The pyramid's 2x means are
   centred identically for both channels, so the coarse shift scales exactly by the level's factor.
2. *Foreground patches.* Patch positions are drawn at random (``seed``) from non-background areas of the
   reference's coarse level, with CSBDeep's ``no_background_patches`` rule (a patch-sized maximum filter above
   0.4 of the 99.9th percentile; we subtract the 1st percentile first, so a camera offset does not make every
   pixel "foreground"). Only these windows are read at full resolution, the moving one displaced by the coarse
   guess rounded to whole pixels.
3. *Refinement*, by one of two methods:

   ``phase`` (default, sub-pixel)
       Each patch pair (128 px; larger when the coarse level is very coarse) is Gaussian-smoothed
       (sigma = 2), mean-subtracted and Hann-windowed; the cross-power spectra of all pairs are *summed* and
       the peak of their sum is located to 1/100 px with :func:`skimage.registration.phase_cross_correlation`
       (upsampled DFT; the summed spectrum is passed in Fourier space against a unit spectrum). We use the
       plain cross-power (``normalization=None``): spectral whitening (``"phase"``) amplifies the pixel noise
       of fluorescence patches and was measured to bias estimates toward whole pixels by 0.1-0.4 px;
       without the Hann window the patch edges cause a similar bias. Summing spectra rather than taking the
       median of per-patch shifts halved the error (measured on simulated actin: <= 0.04 px). The windowed
       estimate is unbiased only for small residuals, so if its whole-pixel part differs from the offset the
       patches were read at, the moving patches are read again at the new offset (at most ``_PHASE_ITER``
       rounds; one when the coarse guess is within half a pixel).
   ``ssim`` (the paper's method, whole pixels)
       Gaussian sigma = 2; 60 x 60 patch pairs (100 by default); the moving patch is displaced by every
       ``(i, j)`` in ``[-5, 5]^2`` so that both are cut to 50 x 50; the mean SSIM (Gaussian window 11,
       sigma 1.5, Wang et al. constants, each channel normalised to its coarse-level 1st/99.9th percentile so
       the data range is 1) is averaged over patches and the best displacement wins. If the best lies on the
       edge of the search window, the search is re-centred there (at most ``_SSIM_RECENTRE`` times), so the
       coarse guess only has to be within a few pixels. SSIM maps are computed for all 121 displacements of a
       patch at once; they equal :func:`skimage.metrics.structural_similarity` (tested).

All patch windows carry a halo of ``int(4 sigma + 0.5)`` px (scipy's Gaussian radius) that is cropped after
smoothing, so a smoothed patch equals the same region of the smoothed whole image.

Applying the shift
------------------
:func:`shift_image` runs :func:`scipy.ndimage.shift` (``mode="nearest"``) through ``map_overlap`` with
``boundary="none"`` and a halo derived by :func:`shift_halo` from the shift and the interpolation order: the
whole-pixel part of the shift, plus the interpolation kernel's reach, plus for spline orders >= 2 the length
after which the spline prefilter's impulse response has decayed below ``_SPLINE_TOL``. For orders 0 and 1 the
tiled result therefore equals ``scipy.ndimage.shift`` of the whole image exactly; for order 3 within 1e-6 of
the data range. The default order 1 (bilinear) keeps each output pixel a convex combination of input pixels.
Every channel is then cropped to the region where all moving channels have data (no extrapolated pixels).
Integer inputs keep their dtype (interpolated values are rounded). Whole-pixel shifts (``ssim``) crop only.

Channels not named as moving are kept and treated as aligned with the reference (acquired simultaneously
with it, like ``phalloidin`` and ``truth`` next to ``AC-15`` in the simulated data). With ``moving_image`` the
moving channels come from a second acquisition of the same field(s); they are appended to the first image's
channels (renamed ``<name>-moving`` if the name is taken).

The estimated shifts are printed by the CLI and stored in the output's provenance under ``registration``.
"""

from l2l_scale.preprocess.dataset import write_dataset
from l2l_scale.preprocess.drift.estimate import METHODS, ShiftEstimate, estimate_shift, gaussian_halo, ssim_search
from l2l_scale.preprocess.drift.registration import register
from l2l_scale.preprocess.drift.shift import common_region, shift_halo, shift_image

__all__ = [
    "METHODS",
    "ShiftEstimate",
    "common_region",
    "estimate_shift",
    "gaussian_halo",
    "register",
    "shift_halo",
    "shift_image",
    "ssim_search",
    "write_dataset",
]
