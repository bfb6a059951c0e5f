"""How fast label.py's page is with thousands of images, measured from a real browser (headless Chromium).

    python tools/label_timing.py /tmp/label5000 --images 5000

Makes FOLDER with --images small PNGs (two per prompt, the prompt in A1111's `parameters` chunk) if it is not
there, then, with label.py run as a user runs it (`python label.py FOLDER --port 0`):
- start-up: from starting the process to the first image shown in the browser, with the OS file cache dropped
  first (cold; needs root, else said) and again at once (warm), with no decision made and with all but the
  last --decisions made;
- a decision: from the key press to the page showing the next image's progress, measured inside the page
  (performance.now at keydown and when #progress changes), median and 90th percentile over --decisions presses,
  with none made before and with all but the last --decisions made;
- decide() itself, in this process, at both ends (the server's share of a decision).
Prints the figures; asserts nothing (timings depend on the machine). The folder is left for a rerun.
"""
import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

# in the page: when each key went down, and when #progress last changed
PROBE = """() => {
  window.__down = []; window.__shown = [];
  document.addEventListener("keydown", () => window.__down.push(performance.now()), true);
  new MutationObserver(() => window.__shown.push(performance.now()))
    .observe(document.getElementById("progress"), {childList: true, characterData: true, subtree: true});
}"""


def make_folder(folder, n):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo
    os.makedirs(folder, exist_ok=True)
    image = Image.new("RGB", (64, 64), (120, 30, 200))
    for i in range(n):
        path = os.path.join(folder, f"gen_{i:05d}.png")
        if not os.path.exists(path):
            info = PngInfo()
            info.add_text("parameters", f"prompt number {i // 2}, a photo\nSteps: 20, Seed: {i}")
            image.save(path, pnginfo=info)


def drop_caches():
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


class Server:
    """label.py in its own process, as a user starts it; the time from its start to the address printed."""

    def __init__(self, folder):
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "label.py"), folder, "--port", "0"],
                                     stdout=subprocess.PIPE, text=True)
        for line in self.proc.stdout:
            m = re.search(r"open (http://\S+)", line)
            if m:
                self.url = m.group(1)
                break
        self.port = int(self.url.rsplit(":", 1)[1].strip("/"))

    def close(self):
        self.proc.terminate()
        self.proc.wait()


def fill(server, k):
    """k decisions through the page's own API (the token is in the page), to start the next phase from."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port)
    conn.request("GET", "/")
    token = re.search(rb'const TOKEN = "([^"]+)"', conn.getresponse().read()).group(1).decode()
    conn.request("GET", "/api/state")
    state = json.loads(conn.getresponse().read())
    for i in range(k):
        conn.request("POST", "/api/decide", json.dumps({"item": state["item"]["files"], "choice": "disliked" if i % 3
                                                        else "liked"}), {"X-Label-Token": token})
        state = json.loads(conn.getresponse().read())
    conn.close()


def first_image(browser, server):
    """Seconds from the server's start to its page showing the first image (loaded, decoded)."""
    page = browser.new_page()
    page.goto(server.url)
    page.wait_for_function("(() => { const i = document.querySelector('#images img');"
                           " return i && i.complete && i.naturalWidth > 0; })()")
    seconds = time.perf_counter() - server.t0
    return page, seconds


def decisions(page, n):
    """Milliseconds from each key press to the page showing the new progress."""
    page.evaluate(PROBE)
    done = int(page.text_content("#progress").split()[0])
    for i in range(n):
        page.keyboard.press("l" if i % 2 else "d")
        page.wait_for_function(f"document.getElementById('progress').textContent.startsWith('{done + i + 1} of')")
    down, shown = page.evaluate("[window.__down, window.__shown]")
    ms = [min(s for s in shown if s >= d) - d for d in down]
    return statistics.median(ms), sorted(ms)[int(0.9 * (len(ms) - 1))]


def decide_ms(folder, n):
    """decide() in this process: the median of the next n decisions after those the folder's journal holds."""
    import label
    labels = label.Labels(folder, pairs=False)
    made = {tuple(d["item"]) for d in labels.decisions}
    todo = [item for item in labels.items if tuple(item) not in made][:n]
    times = []
    for item in todo:
        t = time.perf_counter()
        labels.decide(item, "liked")
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folder")
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--decisions", type=int, default=200, help="key presses timed at each end")
    args = p.parse_args()
    from playwright.sync_api import sync_playwright
    folder = os.path.abspath(args.folder)
    make_folder(folder, args.images)
    for name in (".label_journal.jsonl", "metadata.jsonl", "metadata.before-label.jsonl"):
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    rows = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        for made in (0, args.images - args.decisions):
            if made:
                server = Server(folder)
                fill(server, made - sum(1 for _ in open(os.path.join(folder, "metadata.jsonl"))))
                server.close()
            for cache in ("cold", "warm"):
                dropped = drop_caches() if cache == "cold" else None
                server = Server(folder)
                page, seconds = first_image(browser, server)
                rows.append((f"start, {made} decided, {cache}" + (" (cache not dropped: not root)" if dropped is False else ""),
                             f"{seconds:.2f} s"))
                if cache == "warm":
                    med, p90 = decisions(page, args.decisions)
                    rows.append((f"a decision in the browser, {made} to {made + args.decisions} decided",
                                 f"median {med:.1f} ms, p90 {p90:.1f} ms"))
                page.close()
                server.close()
        browser.close()
    scratch = folder + ".decide"  # decide() alone, on a copy: the folder keeps the browser's decisions
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(folder, scratch, ignore=shutil.ignore_patterns("metadata.jsonl", ".label_journal.jsonl", ".label.lock"))
    rows.append((f"decide() alone, 0 to {args.decisions} decided", f"median {decide_ms(scratch, args.decisions):.2f} ms"))
    decide_ms(scratch, args.images - 2 * args.decisions)
    rows.append((f"decide() alone, {args.images - args.decisions} to {args.images} decided",
                 f"median {decide_ms(scratch, args.decisions):.2f} ms"))
    shutil.rmtree(scratch)
    width = max(len(r[0]) for r in rows)
    print(f"label.py with {args.images} images ({os.cpu_count()} CPUs)")
    for what, figure in rows:
        print(f"{what:<{width}}  {figure}")


if __name__ == "__main__":
    main()
