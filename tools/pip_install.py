"""`pip install ARGS...`, quietly: progress for large downloads, a one-line summary, and pip's
full output only when it fails.

Used by the Makefile's dependency stage. pip's own `-q` hides download progress too, which
leaves a first setup silent for minutes while torch (several GB) downloads; pip's default
output prints a line or more for every requirement on every run. This keeps the useful part:
warnings and errors as pip prints them, and progress for downloads over 10 MB: a live line on
a terminal; elsewhere (CI logs) a line when a download starts and one every 15 s while it runs.

Usage: python tools/pip_install.py -r requirements.txt
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import deque

BIG = 10 * 1024 * 1024
EVERY = 15.0  # seconds between progress lines in a log
# pip's informational lines, shown only if pip fails.
CHATTER = re.compile(
    r"^\s*(Requirement already satisfied|Collecting|Using cached|Looking in|Ignoring|"
    r"Downloading|Obtaining|Preparing metadata|Installing collected packages|"
    r"Attempting uninstall|Found existing installation|Uninstalling|Successfully uninstalled|"
    r"Building wheels? for|Created wheel|Stored in directory|Successfully built|"
    r"Installing build dependencies|Getting requirements to build|Installing backend|"
    r"Requirement already up-to-date|Processing )"
)
DOWNLOAD = re.compile(r"^\s*Downloading (\S+)(?: \(([\d.]+) (kB|MB|GB)\))?")
PROGRESS = re.compile(r"^Progress (\d+) of (\d+)$")
INSTALLING = re.compile(r"^Installing collected packages: (.*)$")
INSTALLED = re.compile(r"^Successfully installed (.*)$")


def main(args: list[str]) -> int:
    command = [sys.executable, "-m", "pip", "install", "--progress-bar", "raw", *args]
    tty = sys.stdout.isatty()
    recent: deque[str] = deque(maxlen=200)  # the lines not shown
    name, total, last = "", 0, 0.0
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as pip:
        assert pip.stdout is not None
        for line in pip.stdout:
            line = line.rstrip("\n")
            if match := PROGRESS.match(line):
                done, total = int(match[1]), int(match[2])
                if total < BIG:
                    continue
                mb = f"{done / 2**20:,.0f} of {total / 2**20:,.0f} MB"
                if tty:
                    end = "\n" if done == total else ""
                    print(f"\r    downloading {name}: {mb}", end=end, flush=True)
                elif done == 0:
                    print(f"    downloading {name} ({total / 2**20:,.0f} MB)", flush=True)
                    last = time.monotonic()
                elif done < total and time.monotonic() - last > EVERY:
                    print(f"    downloading {name}: {mb}", flush=True)
                    last = time.monotonic()
                continue
            if match := INSTALLING.match(line):
                count = len(match[1].split(","))
                if count > 5:  # unpacking several GB takes a minute or more
                    print(f"    installing {count} packages", flush=True)
            if match := INSTALLED.match(line):
                packages = match[1].split()
                plural = "" if len(packages) == 1 else "s"
                print(f"    installed {len(packages)} package{plural}", flush=True)
            elif line.strip() and not CHATTER.match(line):
                print(line, flush=True)
            else:
                recent.append(line)
                if match := DOWNLOAD.match(line):
                    # "torch-2.10.0-cp311-...whl" -> "torch 2.10.0"
                    name = " ".join(match[1].rsplit("/", 1)[-1].split("-")[:2])
    if pip.returncode != 0:
        print(f"pip failed ({' '.join(command)}); its other output:", file=sys.stderr)
        print("\n".join(recent), file=sys.stderr)
    return pip.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
