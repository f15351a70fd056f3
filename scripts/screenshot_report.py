"""Render a run's report.html in headless Chromium and save a PNG of the whole page.

Usage (from the repository root, after ``make demo``)::

    python scripts/screenshot_report.py out/demo/report.html docs/report.png --colors 64

Needs Debian's ``chromium`` package (``apt-get install chromium``). Chromium
runs with networking features off and a throw-away profile, so a report that
needed the network would render broken here, which is part of the point. The
page height is measured first (a tall window, then the document's scroll
height), so the PNG holds the full page.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--hide-scrollbars", "--force-device-scale-factor=1"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("screenshot_report: no chromium on PATH; apt-get install chromium")


def page_height(browser: str, url: str, width: int, profile: str) -> int:
    """The document's scroll height, read back from the DOM Chromium dumps."""
    script = ("<script>document.title='H'+document.documentElement.scrollHeight</script>")
    with tempfile.NamedTemporaryFile("w", suffix=".html", delete=False) as f:
        f.write(f'<iframe id="r" src="{url}" style="width:{width}px;height:100px;border:0" '
                f'onload="document.title=\'H\'+this.contentDocument.documentElement.scrollHeight">'
                f"</iframe>{script}")
        probe = f.name
    out = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}",
                          "--allow-file-access-from-files", "--virtual-time-budget=5000",
                          f"--window-size={width},800", "--dump-dom", f"file://{probe}"],
                         capture_output=True, text=True, timeout=120)
    Path(probe).unlink(missing_ok=True)
    found = re.findall(r"<title>H(\d+)</title>", out.stdout)
    return int(found[-1]) if found else 6000


def quantize(png: Path, colors: int) -> None:
    """Rewrite ``png`` with a palette of ``colors`` colours (Pillow), to keep it small."""
    from PIL import Image

    with Image.open(png) as im:
        small = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    small.save(png, optimize=True)


def screenshot(report: Path, png: Path, width: int = 1100, colors: int = 0) -> Path:
    browser = chromium()
    url = report.resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        height = min(page_height(browser, url, width, profile) + 40, 16000)
        png.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}",
                        f"--screenshot={png.resolve()}", f"--window-size={width},{height}", url],
                       check=True, capture_output=True, timeout=120)
    if colors:
        quantize(png, colors)
    print(f"{png}: {width}x{height} from {report}")
    return png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", type=Path, help="a report.html")
    p.add_argument("png", type=Path, help="where to write the PNG")
    p.add_argument("--width", type=int, default=1100, help="window width in pixels")
    p.add_argument("--colors", type=int, default=0,
                   help="reduce the PNG to this many colours (needs Pillow); 0 keeps it as is")
    args = p.parse_args(argv)
    if not args.report.exists():
        print(f"screenshot_report: no such file {args.report}", file=sys.stderr)
        return 2
    screenshot(args.report, args.png, args.width, args.colors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
