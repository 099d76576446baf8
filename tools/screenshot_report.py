"""Render a report.html in headless Chromium and save a full-page PNG (to look at a page as a person would).

    python tools/screenshot_report.py out/report.html [--out shot.png] [--width 1200]

Chromium's --screenshot captures the window, not the page, so the page is shot in a tall window
and the empty background below its end is cut off; a page longer than the window is shot again
in a window twice as tall (up to --max-height). Needs `chromium` (Debian: apt-get install chromium)
and, for the cropping, Pillow (matplotlib brings it).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def shoot(browser: str, page: Path, out: Path, width: int, height: int) -> None:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
               "--no-first-run", "--allow-file-access-from-files", f"--screenshot={out}",
               f"--window-size={width},{height}", page.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if done.returncode or not out.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"screenshot_report: chromium failed (exit {done.returncode}): {last}")


def content_height(png: Path) -> tuple[int, int] | None:
    """(rows down to the last one that differs from the page background, image height); None without Pillow.
    The background is the top-left pixel's colour (the body's, outside a centred column)."""
    try:
        from PIL import Image, ImageChops
    except ImportError:
        return None
    with Image.open(png) as image:
        rgb = image.convert("RGB")
        background = Image.new("RGB", rgb.size, rgb.getpixel((0, 0)))
        box = ImageChops.difference(rgb, background).getbbox()
        return (box[3] if box else 0), rgb.height


def crop(png: Path, height: int, margin: int = 24) -> None:
    from PIL import Image

    with Image.open(png) as image:
        cropped = image.crop((0, 0, image.width, min(image.height, height + margin)))
    cropped.save(png)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("page", type=Path, help="the HTML file")
    parser.add_argument("--out", type=Path, help="PNG to write (default: the page's name with .png)")
    parser.add_argument("--width", type=int, default=1200, help="window width in CSS pixels (default 1200)")
    parser.add_argument("--height", type=int, default=6000, help="first window height to try (default 6000)")
    parser.add_argument("--max-height", type=int, default=32000, help="tallest window to try (default 32000)")
    args = parser.parse_args(argv)
    if not args.page.is_file():
        print(f"screenshot_report: no such file {args.page}", file=sys.stderr)
        return 2
    browser = find_browser()
    if browser is None:
        print("screenshot_report: chromium is not installed (Debian: apt-get install chromium)", file=sys.stderr)
        return 1
    out = args.out or args.page.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    height = args.height
    with tempfile.TemporaryDirectory() as scratch:
        shot = Path(scratch) / "shot.png"
        while True:
            shoot(browser, args.page, shot, args.width, height)
            measured = content_height(shot)
            if measured is None:  # no Pillow: keep the whole window
                break
            used, total = measured
            if used < total - 8 or height >= args.max_height:  # blank space below the page: it all fit
                crop(shot, used)
                break
            height = min(height * 2, args.max_height)
        shutil.copyfile(shot, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
