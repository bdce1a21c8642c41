"""Human-readable description of what :func:`l2l_scale.io.read.read_info` returns."""

from __future__ import annotations

import json


def _image_lines(info: dict, indent: str = "") -> list[str]:
    px = ", ".join(f"{d}={v:g}" for d, v in info["pixel_size"].items())
    unit = next(iter(info.get("units", {}).values()), "")
    lines = [
        f"{indent}NGFF version: {info['ngff_version']}",
        f"{indent}dims:         {' '.join(info['dims'])}",
        f"{indent}shape:        {' x '.join(map(str, info['shape']))}",
        f"{indent}dtype:        {info['dtype']}",
        f"{indent}chunks:       {' x '.join(map(str, info['chunks']))}",
        f"{indent}pixel size:   {px} {unit}",
        f"{indent}levels:       {len(info['levels'])} ({'; '.join(' x '.join(map(str, s)) for s in info['levels'])})",
        f"{indent}channels:     {', '.join(info['channels']) if info['channels'] else '(none named)'}",
    ]
    return lines


def _provenance_lines(prov: dict | None, indent: str = "") -> list[str]:
    if not prov:
        return []
    lines = [f"{indent}l2l-scale provenance:"]
    for key in ("version", "created", "command", "input"):
        if prov.get(key) is not None:
            lines.append(f"{indent}  {key}: {prov[key]}")
    for key, val in prov.items():
        if key not in ("version", "created", "command", "input"):
            lines.append(f"{indent}  {key}: {json.dumps(val)}")
    return lines


def format_info(info: dict) -> str:
    """Format an info dict as aligned text for the terminal."""
    lines = [f"{info['path']}  ({info['kind']})"]
    if info["kind"] == "plate":
        plate = info["plate"]
        lines += [
            f"NGFF version: {info['ngff_version']}",
            f"plate:        {plate['name']}  rows {','.join(plate['rows'])}  columns {','.join(plate['columns'])}",
            f"wells:        {len(plate['wells'])} ({', '.join(plate['wells'])})",
            f"fields:       {len(plate['fields'])} ({', '.join(plate['fields'])})",
        ]
        if info.get("field"):
            lines.append(f"first field {plate['fields'][0]}:")
            lines += _image_lines(info["field"], "  ")
        lines += _provenance_lines(info.get("provenance"))
    elif info["kind"] in ("folder", "well"):
        lines.append(f"images:       {len(info['images'])} ({', '.join(info['images'])})")
    else:
        lines += _image_lines(info)
        lines += _provenance_lines(info.get("provenance"))
    return "\n".join(lines)
