"""Screenshot a hilq HTML report in headless Chromium, to check that it opens and shows its
plots with no network and no browser profile.

    python scripts/screenshot_report.py reports/<run-id>/report.html --out shot.png
    python scripts/screenshot_report.py --run latest [--db URL] --out shot.png   # render first

Exit 0 with the screenshot written; 2 when Chromium is not installed (`apt-get install -y
chromium`) or the page could not be captured.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def screenshot(html: str | Path, png: str | Path, *, width: int = 1400, height: int = 5000,
               browser: str | None = None, timeout_s: float = 180) -> Path:
    """Render `html` in a fresh, isolated headless Chromium profile and save a PNG."""
    browser = browser or find_chromium()
    if not browser:
        raise FileNotFoundError("chromium (apt-get install -y chromium)")
    html, png = Path(html).resolve(), Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="hilq-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--screenshot={png}",
               f"--window-size={width},{height}", html.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}): "
                           f"{proc.stderr.strip()[-500:]}")
    return png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", nargs="?", help="report.html to capture (default: render --run)")
    ap.add_argument("--run", default="latest", help="run id or 'latest' when rendering")
    ap.add_argument("--db", default=None, help="store URL or SQLite path (default $HILQ_DB)")
    ap.add_argument("--out", default="report-screenshot.png")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=5000)
    args = ap.parse_args(argv)
    html = args.html
    if html is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from bench.report import render
        from bench.store import open_store

        with open_store(args.db) as store:
            html = render(store, args.run).html
    try:
        png = screenshot(html, args.out, width=args.width, height=args.height)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"screenshot_report: error: {e}", file=sys.stderr)
        return 2
    print(f"screenshot of {html}: {png} ({png.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
