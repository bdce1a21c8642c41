"""Viewers of a restored plate, besides l2l-scale's own reader and ome-zarr-py (tests/test_convert.py):

- a second, independent reader: zarr plus ome-zarr-models' NGFF 0.5 HCS, well and image models, which list every
  well and field and lead to the same pixels;
- a pure-JS viewer: a page using zarrita (vendored from the npm registry at test time, no CDN) renders a restored
  field into a canvas in headless Chromium, and the screenshot equals the same rendering done here.
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import subprocess
import threading

import numpy as np
import pytest
import xarray as xr
import zarr

from l2l_scale.io.read import open_image
from l2l_scale.io.write import write_plate

KEYS = ["A/1/0", "A/1/1", "B/3/0"]
ZARRITA = "zarrita@0.7.5"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def restored(tmp_path_factory):
    from l2l_scale.model import ModelSpec, build_unet, export_model
    from l2l_scale.predict import predict
    from l2l_scale.synthetic import simulate

    base = tmp_path_factory.mktemp("viewers")
    spec = ModelSpec(unet_n_depth=1, unet_n_first=8, unet_kern_size=3)
    model = export_model(build_unet(spec), spec, base / "m", metadata={"channels": {"input": ["AC-15"]}})
    fields = {k: xr.DataArray(np.asarray(simulate("actin", 48, seed=i).values), dims=("c", "y", "x"),
                              coords={"c": ["AC-15", "phalloidin", "truth"]}, attrs={"pixel_size": 0.05})
              for i, k in enumerate(KEYS)}
    write_plate(fields, base / "plate.zarr", chunks=32)
    return predict(model, base / "plate.zarr", base / "restored.zarr", tile=32)


def test_restored_plate_lists_every_well_and_field_in_ome_zarr_models(restored):
    from ome_zarr_models.v05.hcs import HCS
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.well import Well

    out = restored
    keys = KEYS
    root = zarr.open_group(str(out), mode="r")
    hcs = HCS.from_zarr(root)
    listed = []
    for well in hcs.ome_attributes.plate.wells:
        w = Well.from_zarr(root[well.path])
        for image in w.ome_attributes.well.images:
            key = f"{well.path}/{image.path}"
            img = Image.from_zarr(root[key])
            (ms,) = img.ome_attributes.multiscales
            assert [a.name for a in ms.axes] == ["c", "y", "x"]
            level0 = np.asarray(root[f"{key}/{ms.datasets[0].path}"][...])
            np.testing.assert_array_equal(level0, open_image(out, field=key).values)
            assert level0.shape == (1, 48, 48) and np.isfinite(level0).all()
            listed.append(key)
    assert sorted(listed) == keys
    assert {r.name for r in hcs.ome_attributes.plate.rows} == {"A", "B"}
    assert pytest.approx(sorted(c.name for c in hcs.ome_attributes.plate.columns)) == ["1", "3"]


_PAGE = """<!doctype html><html><head><style>body{margin:0;background:#fff}canvas{display:block}</style>
<script type="importmap">IMPORTMAP</script></head><body><canvas id="c"></canvas>
<script type="module">
import * as zarr from "zarrita";
try {
  const root = zarr.root(new zarr.FetchStore(new URL("FIELD/", location.href).href));
  const ome = (await zarr.open(root, {kind: "group"})).attrs.ome;
  const arr = await zarr.open(root.resolve(ome.multiscales[0].datasets[0].path), {kind: "array"});
  const {data, shape} = await zarr.get(arr, [0, null, null]);
  const {start, end} = ome.omero.channels[0].window;
  const canvas = document.getElementById("c");
  [canvas.height, canvas.width] = shape;
  const ctx = canvas.getContext("2d");
  const rgba = ctx.createImageData(shape[1], shape[0]);
  for (let i = 0; i < data.length; i++) {
    const g = Math.round(255 * Math.min(1, Math.max(0, (data[i] - start) / (end - start))));
    rgba.data.set([g, g, g, 255], 4 * i);
  }
  ctx.putImageData(rgba, 0, 0);
  document.body.dataset.rendered = shape.join("x");
} catch (e) { document.body.dataset.error = String(e); }
</script></body></html>"""


def _vendor_npm(folder):
    """``npm install`` zarrita into ``folder`` and map every package's browser entry points (an import map)."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed; the JS viewer test vendors zarrita from the npm registry")
    res = subprocess.run(["npm", "install", "--prefix", str(folder), "--no-audit", "--no-fund", ZARRITA],
                         capture_output=True, text=True, timeout=300)
    if res.returncode:
        pytest.skip(f"npm could not install {ZARRITA} (offline?): {res.stderr.strip().splitlines()[-1:]}")
    imports = {}
    for pkg_json in (folder / "node_modules").glob("**/package.json"):
        meta = json.loads(pkg_json.read_text())
        name, rel = meta.get("name"), pkg_json.parent.relative_to(folder).as_posix()
        if not name or "node_modules" in pkg_json.parent.relative_to(folder / "node_modules").parts:
            continue
        exports = meta.get("exports") or {".": meta.get("module") or meta.get("main")}
        for sub, target in (exports.items() if isinstance(exports, dict) else [(".", exports)]):
            while isinstance(target, dict):  # conditional exports: the browser's ESM entry
                target = target.get("browser") or target.get("import") or target.get("default")
            if isinstance(target, str) and sub.startswith("."):
                imports[name + sub[1:]] = f"./{rel}/{target.removeprefix('./')}"
    return imports


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it in .ci/run: apt-get install "
                                             "-y chromium)")
def test_js_viewer_renders_a_restored_field_in_headless_chromium(restored, tmp_path):
    from PIL import Image as PILImage

    site = tmp_path / "site"
    site.mkdir()
    imports = _vendor_npm(site)
    shutil.copytree(restored, site / "restored.zarr")
    key = KEYS[0]
    (site / "index.html").write_text(_PAGE.replace("IMPORTMAP", json.dumps({"imports": imports}))
                                     .replace("FIELD", f"restored.zarr/{key}"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/index.html"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
             "--disable-background-networking", "--disable-component-update", "--force-device-scale-factor=1",
             "--run-all-compositor-stages-before-draw", "--virtual-time-budget=30000"]
    shot = tmp_path / "shot.png"
    try:
        # Headless Chromium's virtual time can end before the async fetches finish on a loaded machine: retry.
        for attempt in range(3):
            profile = f"--user-data-dir={tmp_path / f'profile{attempt}'}"
            dom = subprocess.run([*flags, profile, "--dump-dom", url], capture_output=True, text=True, timeout=120)
            body = dom.stdout[dom.stdout.find("<body"):][:300]
            if "data-rendered" in body or "data-error" in body:
                break
        for attempt in range(3):
            profile = f"--user-data-dir={tmp_path / f'shot{attempt}'}"
            subprocess.run([*flags, profile, f"--screenshot={shot}", "--window-size=200,200", url],
                           capture_output=True, timeout=120)
            if shot.is_file() and np.asarray(PILImage.open(shot).convert("L"))[:48, :48].std() > 0:
                break
    finally:
        server.shutdown()
    assert 'data-rendered="48x48"' in body, (body, dom.stderr[-1500:])
    got = np.asarray(PILImage.open(shot).convert("L"), dtype=np.int16)[:48, :48]
    attrs = zarr.open_group(str(restored / key), mode="r").attrs["ome"]
    window = attrs["omero"]["channels"][0]["window"]
    data = open_image(restored, field=key).values[0]
    want = np.round(255 * np.clip((data - window["start"]) / (window["end"] - window["start"]), 0, 1))
    assert np.abs(got - want).max() <= 1 and want.std() > 10  # the restored pixels, not a blank canvas
