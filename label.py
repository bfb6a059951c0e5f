"""Label your own images in the browser: like / dislike (for Diffusion-KTO) or left / right / tie (for Diffusion-DPO).

    python label.py FOLDER                  # one image at a time: L like, D dislike, S skip, U undo
    python label.py FOLDER --pairs          # two images of one prompt: 1 or <- left, 2 or -> right, T tie
    python label.py FOLDER --generate MODEL --prompts prompts.txt --n 4    # no images yet: make them first

It serves one page on 127.0.0.1 and prints its address. Images at any depth below FOLDER (png, jpg, jpeg, webp)
take their prompt from where the front end that made them put it (data.caption_beside: AUTOMATIC1111/Forge,
ComfyUI, Fooocus, or a .txt beside the image) or from a metadata.jsonl already there. Images are never moved
or changed. label.py writes into FOLDER:
- metadata.jsonl, one {"file_name", "text", "label": "liked"|"disliked"} per image: `train_kto.py --data FOLDER`
- pairs.jsonl, one {"caption", "chosen", "rejected"} per decided pair: `train_dpo.py --data FOLDER/pairs.jsonl`
- .label_journal.jsonl: every decision in order (skips, ties and undos too), the record both files are built from.
A decision is appended to the journal and fsynced before the page moves on, then its line is appended to
metadata.jsonl or pairs.jsonl (one write; a failed one is cut back, so neither file ever holds half a line); an undo
rewrites the file whole under a temporary name and renames it. A restart replays the journal and rewrites both
files from it: the page opens on the first undecided image, and undo goes on working. Images it does not show
are counted, and listed with why on the page; skipped images can be shown again.
A metadata.jsonl or pairs.jsonl that label.py did not write is kept as *.before-label.jsonl and its labels
carried over; so are the labels of images under liked/ and disliked/ folders.

Safety: binds 127.0.0.1 unless --host says otherwise; serves only the images it found inside FOLDER (a path
with .., an absolute path, a symlink out of FOLDER: 404); a write needs the random token of this run, which only
the served page knows (another site open in the browser gets 403), and a Host header naming this machine. Served
beyond the loopback (--host 0.0.0.0, a LAN address), every request also needs this run's key: the address printed
at the start carries it (?key=...), the page that address opens keeps it in a same-site cookie, and anyone else on
the network, or a page whose domain resolves to this machine (DNS rebinding), gets 403; the Host must be an IP
address, localhost or this machine's name.
"""
import argparse
import errno
import hashlib
import hmac
import json
import mimetypes
import os
import re
import secrets
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

from files import PRECISIONS, atomic_path, fail, read_jsonl
from data import CAPTION_KEYS, IMAGE_EXTS, UNREADABLE, caption_beside, image_complete, parse_label

JOURNAL, METADATA, PAIRS = ".label_journal.jsonl", "metadata.jsonl", "pairs.jsonl"
CHOICES = {False: ("liked", "disliked", "skip"), True: ("left", "right", "tie", "skip")}  # single images, pairs
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "label.html")


def write_lines(path, lines):
    """The whole file under a temporary name, then renamed: a reader sees the old file or the new one."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)


# ------------------------------------------------------------------------------------------------
# the folder: images, their prompts, the decisions on them

class Labels:
    """The images of a folder and the stack of decisions on them; one lock guards every change."""

    def __init__(self, folder, pairs):
        self.root, self.pairs, self.lock = os.path.realpath(folder), pairs, threading.Lock()
        self.not_shown = []  # (file, reason) of each image found but not shown: the page lists them
        self.files, self.captions = self.scan()
        self.items = self.make_pairs() if pairs else [[f] for f in self.files]
        if not self.items:  # checked before anything is written
            fail(f"no images (png, jpg, jpeg, webp) in {folder}" if not self.skipped and not self.files else
                 f"no images with a prompt in {folder} (skipped {self.skip_line()})" if not self.files else
                 f"no two images with the same prompt in {folder}: --pairs needs 2 or more images per prompt")
        journal = os.path.join(self.root, JOURNAL)
        for name in os.listdir(self.root):  # what a kill during a rewrite left under a temporary name (atomic_path)
            if re.fullmatch(rf"({re.escape(METADATA)}|{re.escape(PAIRS)}|{re.escape(JOURNAL)})\.tmp\d+", name):
                os.remove(os.path.join(self.root, name))
        try:
            self.decisions = replay(read_jsonl(journal)) if os.path.exists(journal) else self.carry_over()
            write_lines(journal, [json.dumps(d) for d in self.decisions])  # compacted: undone decisions dropped
            self.reindex()
            self.write_outputs()
        except OSError as e:
            fail(f"cannot write into {folder} ({e.strerror or e}): label.py keeps its labels there")

    def leave_out(self, rel, why):
        self.not_shown.append((rel, why))

    @property
    def skipped(self):  # reason -> how many images it left out, shown on the page and printed
        return Counter(why for _, why in self.not_shown)

    def skip_line(self):
        return ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"

    def scan(self):
        """Image paths relative to the root (sorted, '/'-separated) and their prompts. Hidden files and folders
        are left out; so is a symlink that leads out of the folder. Reads each image's header, not its pixels."""
        self.known = known = {}  # file_name -> caption from a metadata.jsonl that label.py did not write
        for name in ("metadata.before-label.jsonl", METADATA):
            path = os.path.join(self.root, name)
            if os.path.exists(path) and (name != METADATA or not os.path.exists(os.path.join(self.root, JOURNAL))):
                for row in read_jsonl(path):
                    text = next((row[k] for k in CAPTION_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
                    if text and isinstance(row.get("file_name"), str):
                        known[row["file_name"].replace(os.sep, "/")] = text.strip()
        files, captions = [], {}
        for folder, dirs, names in os.walk(self.root, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                full = os.path.join(folder, name)
                if name.startswith(".") or not name.lower().endswith(IMAGE_EXTS):
                    continue
                real = os.path.realpath(full)
                rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                if not real.startswith(self.root + os.sep):
                    self.leave_out(rel, "links out of the folder"); continue
                if real != full and (os.path.basename(real).startswith(".") or not real.lower().endswith(IMAGE_EXTS)):
                    self.leave_out(rel, "links to something not an image"); continue  # e.g. x.png -> the journal
                caption = known.get(rel) or caption_beside(full)
                if caption is UNREADABLE:
                    self.leave_out(rel, "unreadable images"); continue
                if not image_complete(full):  # its header reads, its end is missing: the trainer would drop it
                    self.leave_out(rel, "incomplete images (cut short, or still being written)"); continue
                if not caption:
                    self.leave_out(rel, "images without a prompt (no .txt beside it, none in the PNG)"); continue
                files.append(rel)
                captions[rel] = caption
        return sorted(files), captions

    def carry_over(self):
        """First run in this folder: keep the labels the folder already has, and the files that held them."""
        decisions = []
        for rel in self.files:  # liked/ and disliked/ folders (their first part, any letter case)
            label = {"liked": "liked", "disliked": "disliked"}.get(rel.split("/")[0].lower()) if "/" in rel else None
            decisions += [{"item": [rel], "choice": label}] if label else []
        shown = {tuple(item) for item in self.items}
        for name, keys in ((METADATA, None), (PAIRS, ("chosen", "rejected"))):
            path = os.path.join(self.root, name)
            backup = path.replace(".jsonl", ".before-label.jsonl")
            if os.path.exists(path) and not os.path.exists(backup):
                os.replace(path, backup)  # kept as it was; the new file is written from the journal
            # both there: a folder copied without its dot-files (cp -r src/* dst/), or whose journal was deleted.
            # The file is then label.py's own, written from the journal: every label still standing, those carried
            # from the backup included, and none undone since; so it alone is read, never the backup
            source = path if os.path.exists(path) else backup
            if os.path.exists(source):
                for row in read_jsonl(source):
                    if keys is None and parse_label(row.get("label")) and isinstance(row.get("file_name"), str):
                        decisions.append({"item": [row["file_name"]],
                                          "choice": "liked" if parse_label(row["label"]) > 0 else "disliked"})
                    elif keys and all(isinstance(row.get(k), str) for k in keys):
                        chosen, rejected = row["chosen"], row["rejected"]  # as the page shows the pair: left or right
                        decisions.append({"item": [rejected, chosen], "choice": "right"} if (rejected, chosen) in shown
                                         else {"item": [chosen, rejected], "choice": "left"})
        latest = {}  # one decision per item, the last
        for d in decisions:
            latest.pop(tuple(d["item"]), None)
            latest[tuple(d["item"])] = d
        return list(latest.values())

    def make_pairs(self):
        """Images grouped by prompt, each image in one pair: (1st, 2nd), (3rd, 4th), ... of its group. Which one
        is shown on the left is fixed by a hash of the two names, so a restart shows the same page."""
        groups = {}
        for f in self.files:
            groups.setdefault(self.captions[f], []).append(f)
        pairs = []
        for group in groups.values():
            for a, b in zip(group[0::2], group[1::2]):
                pairs.append([b, a] if hashlib.sha256(f"{a}\0{b}".encode()).digest()[0] & 1 else [a, b])
            if len(group) % 2:
                self.leave_out(group[-1], "images without a partner (no other image of its prompt left to pair it with)")
        return pairs

    # --- what the trainers read: rewritten whole at the start and after an undo, one line appended per decision

    def output_line(self, item, choice):
        """(file, line) a decision adds to metadata.jsonl or pairs.jsonl, or None (a skip, a tie)."""
        if len(item) == 1 and choice in ("liked", "disliked"):
            return METADATA, json.dumps({"file_name": item[0], "text": self.caption(item[0]), "label": choice})
        if len(item) == 2 and choice in ("left", "right"):
            chosen, rejected = item if choice == "left" else item[::-1]
            return PAIRS, json.dumps({"caption": self.caption(chosen), "chosen": chosen, "rejected": rejected})
        return None

    def write_outputs(self):
        lines = {METADATA: {}, PAIRS: {}}  # one row per image (or pair): the last decision on it wins
        for d in self.decisions:
            out = self.output_line(d["item"], d["choice"])
            if out:
                lines[out[0]].pop(tuple(d["item"]), None)
                lines[out[0]][tuple(d["item"])] = out[1]
        for name, rows in lines.items():  # never an empty file that was not there before:
            path = os.path.join(self.root, name)  # it would hide liked/ and disliked/ folders from train_kto.py
            if rows or os.path.exists(path):
                write_lines(path, rows.values())
        self.stale = False

    def caption(self, rel):  # a carried-over label of an image that is gone keeps its old caption, if any
        return self.captions.get(rel) or self.known.get(rel) or ""

    # --- the page's three questions: what now, decide, undo

    def reindex(self):
        """What the page asks after each decision, kept up to date by decide() instead of recounted from the whole
        stack (a decision costs the same with 5000 made as with none): rebuilt here after a start or an undo."""
        self.decided = {tuple(d["item"]): d["choice"] for d in self.decisions}
        self.counts = Counter(self.decided[tuple(i)] for i in self.items if tuple(i) in self.decided)
        self.n_mine, self.cursor = len(self.mine()), 0  # every item before the cursor is decided

    def todo(self, n):
        """The first n undecided items in the list's order."""
        while self.cursor < len(self.items) and tuple(self.items[self.cursor]) in self.decided:
            self.cursor += 1
        found, i = [], self.cursor
        while i < len(self.items) and len(found) < n:
            if tuple(self.items[i]) not in self.decided:
                found.append(self.items[i])
            i += 1
        return found

    def state(self, error=None):
        todo = self.todo(2) + [None, None]
        view = lambda item: item and {"files": item, "urls": ["/img/" + quote(f) for f in item],
                                      "caption": self.captions[item[0]]}
        return {"mode": "pairs" if self.pairs else "single", "item": view(todo[0]), "next": view(todo[1]),
                "done": sum(self.counts.values()), "total": len(self.items),
                "counts": {c: self.counts[c] for c in CHOICES[self.pairs]}, "can_undo": self.n_mine > 0,
                "skipped": self.skip_line(), "not_shown": len(self.not_shown), "folder": self.root, "error": error}

    def decide(self, item, choice):
        """Record one decision; returns an error line for bad input (the page shows it), else None."""
        if choice not in CHOICES[self.pairs]:
            return f"unknown label {choice!r}: expected one of {', '.join(CHOICES[self.pairs])}"
        with self.lock:
            if item not in self.items:
                return f"not an image of this folder's list: {item!r}"
            if tuple(item) in self.decided:
                return "already decided (in another tab?): showing the next one"
            self.append({"item": item, "choice": choice})  # the record: on disk before anything else changes
            self.decisions.append({"item": item, "choice": choice})
            self.decided[tuple(item)] = choice
            self.counts[choice] += 1
            self.n_mine += 1
            return self.update_outputs(item, choice)

    def update_outputs(self, item=None, choice=None):
        """metadata.jsonl or pairs.jsonl gets the decision's line (none for a skip or a tie). A write that fails
        (a full disk) is cut back, so the file stays whole without it; the label is in the journal already, and
        the file is rewritten whole from it at the next decision or start."""
        try:
            if self.stale:
                self.write_outputs()
            else:
                out = self.output_line(item, choice)
                if out:
                    append_line(os.path.join(self.root, out[0]), out[1], durable=False)  # the journal is durable
        except OSError as e:
            self.stale = True
            return (f"saved in the journal, but {PAIRS if self.pairs else METADATA} could not be updated "
                    f"({e.strerror or e}): it is rewritten from the journal at the next decision or start")

    def mine(self):
        """Indices of this mode's decisions (pairs or single images) in the stack."""
        return [i for i, d in enumerate(self.decisions) if (len(d["item"]) == 2) == self.pairs]

    def undo(self):
        """Take back the last decision of this mode; the other mode's labels stay."""
        with self.lock:
            last = self.mine()
            if not last:
                return "nothing to undo"
            self.append({"undo": True, "pairs": self.pairs})
            del self.decisions[last[-1]]
            self.reindex()
            self.stale = True  # an undone line may sit anywhere in the file: rewritten whole
            return self.update_outputs()

    def unskip(self):
        """Show this mode's skipped images (or pairs) again: they return to the queue in the list's order."""
        with self.lock:
            if not any(d["choice"] == "skip" and (len(d["item"]) == 2) == self.pairs for d in self.decisions):
                return "nothing skipped"
            self.append({"unskip": True, "pairs": self.pairs})
            self.decisions = replay([{"unskip": True, "pairs": self.pairs}], self.decisions)
            self.reindex()

    def append(self, record):
        """One record at the end of the journal, on disk (fsynced) before this returns."""
        append_line(os.path.join(self.root, JOURNAL), json.dumps(record))


def append_line(path, line, durable=True):
    """One line at the end of a file in one write. A line cut short by an earlier kill is closed first, so this one
    starts on a line of its own and is never read as part of the fragment (which readers drop); a write that fails
    (a full disk) is cut back, so the file is never left holding half of this line."""
    existed = os.path.exists(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        torn = end > 0 and os.pread(fd, 1, end - 1) != b"\n"
        data = (b"\n" if torn else b"") + (line + "\n").encode("utf-8")
        try:
            while data:
                data = data[os.write(fd, data):]
            if durable:
                os.fsync(fd)
        except OSError:
            os.ftruncate(fd, end)  # needs no free space
            if not existed:  # nor an empty file that was not there (an empty metadata.jsonl hides liked/ folders)
                os.remove(path)
            raise
    finally:
        os.close(fd)


def replay(records, stack=None):
    """label.py's journal, in order, as the stack of decisions it leaves: a decision pushes (an unknown choice is
    ignored); {"undo": true, "pairs": mode} removes the last decision of that mode (a journal holds both modes'
    decisions: undo in one never takes back the other's; an undo written before modes were recorded takes the
    last decision, as it did then); {"unskip": true, "pairs": mode} removes that mode's skips (shown again)."""
    stack = list(stack or [])
    for r in records:
        kind = r.get("pairs")
        if r.get("undo"):
            last = [i for i, d in enumerate(stack) if kind is None or (len(d["item"]) == 2) == kind]
            if last:
                del stack[last[-1]]
        elif r.get("unskip"):
            stack = [d for d in stack if d["choice"] != "skip" or (len(d["item"]) == 2) != kind]
        elif isinstance(r.get("item"), list) and r.get("choice") in CHOICES[len(r["item"]) == 2]:
            stack.append({"item": r["item"], "choice": r["choice"]})
    return stack


def decisions_in(folder):
    """The decisions label.py holds for FOLDER, replayed from its journal: {file: choice} for single images
    ("liked", "disliked" or "skip"; the last decision wins). Read while a label.py serves the folder, too."""
    out = {}
    for d in replay(read_jsonl(os.path.join(folder, JOURNAL))):
        if len(d["item"]) == 1:
            out[d["item"][0]] = d["choice"]
    return out


# ------------------------------------------------------------------------------------------------
# the server: the page, its two calls, the images

class Handler(BaseHTTPRequestHandler):
    labels, token, page, hosts, key, names = None, None, b"", None, None, set()  # set by make_server
    timeout = 60  # seconds a connection may sit idle: a silent client does not hold a thread forever

    def log_message(self, *args):  # quiet: one line per image shown would bury the address
        pass

    def reply(self, code, body, kind="application/json", cache="no-store", headers=()):
        body = json.dumps(body).encode() if kind == "application/json" else body
        self.send_response(code)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)  # images do not change; the state does
        # no other page may frame this one (one click on a decoy placed over a button would post a label)
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Content-Security-Policy", "frame-ancestors 'none'")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def host_ok(self):  # a page of another site that resolves its own name to this machine still sends its name
        host = self.headers.get("Host", "")
        if self.hosts is not None:  # the loopback: exactly 127.0.0.1:PORT or localhost:PORT
            return host in self.hosts
        name = host.rsplit(":", 1)[0].strip("[]") if not host.startswith("[") else host[1:host.find("]")]
        return is_ip(name) or name.lower() in self.names

    def key_ok(self):
        """Beyond the loopback: this run's key, from the printed address (?key=) or the cookie its page got."""
        if self.key is None:
            return True
        given = parse_qs(urlsplit(self.path).query).get("key", [""])[0]
        for part in self.headers.get("Cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == "label_key":
                given = given or value
        return hmac.compare_digest(given.encode(), self.key.encode())

    def do_GET(self):
        self.answer(self.get)

    def do_POST(self):
        self.answer(self.post)

    def answer(self, handle):
        """A malformed request (a NUL byte in a path, JSON nested thousands deep, undecodable bytes) gets 400 and
        one log line, a failed write (a full disk, a read-only file) 500 with the reason, which the page shows;
        never a traceback and a dropped connection."""
        try:
            handle()
        except (ValueError, RecursionError, UnicodeError) as e:
            print(f"label.py: rejected a malformed request ({type(e).__name__})", flush=True)
            self.reply(400, {"error": "malformed request"})
        except OSError as e:
            print(f"label.py: could not save: {e.strerror or e}", flush=True)
            with self.labels.lock:
                self.reply(500, self.labels.state(f"could not save this label ({e.strerror or e}): it was not "
                                                  f"recorded; free the disk or fix the folder, then try again"))

    def get(self):
        path = urlsplit(self.path).path
        if not self.host_ok():
            return self.reply(403, {"error": "wrong Host header"})
        if not self.key_ok():
            return self.reply(403, {"error": "open the address label.py printed (it carries this run's key)"})
        if path == "/":
            cookie = [("Set-Cookie", f"label_key={self.key}; HttpOnly; SameSite=Strict; Path=/")] if self.key else []
            return self.reply(200, self.page, "text/html; charset=utf-8", headers=cookie)
        if path == "/api/state":
            with self.labels.lock:
                return self.reply(200, self.labels.state())
        if path == "/api/not_shown":  # the images found but not shown, each with why
            return self.reply(200, [{"file": f, "why": why} for f, why in self.labels.not_shown])
        if path.startswith("/img/"):
            rel = unquote(path[len("/img/"):])
            full = os.path.realpath(os.path.join(self.labels.root, rel))
            if rel in self.labels.captions and full.startswith(self.labels.root + os.sep) and os.path.isfile(full):
                with open(full, "rb") as f:
                    return self.reply(200, f.read(), mimetypes.guess_type(full)[0] or "image/png", "max-age=3600")
        self.reply(404, {"error": "not found"})

    def post(self):
        if not self.host_ok() or not self.key_ok() or \
                not hmac.compare_digest(self.headers.get("X-Label-Token", "").encode(), self.token.encode()):
            return self.reply(403, {"error": "missing or wrong token: reload the page label.py printed"})
        try:
            body = json.loads(self.rfile.read(min(max(0, int(self.headers.get("Content-Length") or 0)), 1 << 16)) or b"{}")
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
            body = None
        path = urlsplit(self.path).path
        if path == "/api/decide" and isinstance(body, dict):
            error = self.labels.decide(body.get("item"), body.get("choice"))
        elif path == "/api/undo":
            error = self.labels.undo()
        elif path == "/api/unskip":
            error = self.labels.unskip()
        else:
            return self.reply(400, {"error": "expected POST /api/decide {item, choice}, /api/undo or /api/unskip"})
        if error:
            print(f"label.py: {error}", flush=True)
        with self.labels.lock:
            self.reply(400 if error and not error.startswith(("already", "nothing", "saved")) else 200,
                       self.labels.state(error))


def make_server(labels, host="127.0.0.1", port=8765):
    """A ThreadingHTTPServer for `labels` (not yet serving); port 0 picks a free port. A port in use: one line."""
    handler = type("LabelHandler", (Handler,), {"labels": labels, "token": secrets.token_urlsafe(24)})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            fail(f"port {port} on {host} is in use (another label.py?): pass --port with another number, or --port 0")
        fail(f"cannot serve on {host}:{port}: {e.strerror or e}")
    server.daemon_threads = True
    port = server.server_address[1]
    if host in ("127.0.0.1", "localhost"):
        handler.hosts = {f"127.0.0.1:{port}", f"localhost:{port}"}
    else:  # reachable from the network: every request needs this run's key too
        handler.key, handler.names = secrets.token_urlsafe(16), local_names()  # names looked up once, not per request
    with open(PAGE, encoding="utf-8") as f:
        handler.page = f.read().replace("__TOKEN__", handler.token).encode()
    server.url = f"http://{'127.0.0.1' if host in ('', '0.0.0.0') else host}:{port}/" + \
        (f"?key={handler.key}" if handler.key else "")
    return server


def is_ip(name):
    import ipaddress
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def lan_address():
    """This machine's address on its network (the interface of its default route), or None. A UDP socket's connect
    only picks the route: nothing is sent."""
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("10.254.254.254", 1))
        return s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()


def local_names():
    """The names a browser on the network may use for this machine (an IP address is always accepted)."""
    import socket
    name = socket.gethostname().lower()
    return {"localhost", name, name + ".local", socket.getfqdn().lower()}


# ------------------------------------------------------------------------------------------------

LOCK = ".label.lock"


def lock_folder(folder):
    """Hold an exclusive lock on FOLDER/.label.lock while this process runs: a second label.py on the same folder
    (its journal writes would interleave with this one's, and each would rewrite the labels from its own memory)
    stops with one line. The kernel drops the lock with the process, however it ends; returns the open file."""
    import fcntl
    f = open(os.path.join(folder, LOCK), "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        fail(f"another label.py is already serving {os.path.realpath(folder)}: use its page, or stop it first "
             f"(two servers on one folder would overwrite each other's labels)")
    return f


def main(argv=None):
    p = argparse.ArgumentParser(description="Label images in the browser for train_kto.py (like/dislike) or "
                                "train_dpo.py (--pairs).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("folder", help="the images (any depth below it); metadata.jsonl and pairs.jsonl are written here")
    a("--pairs", action="store_true", help="two images of the same prompt side by side: left, right or tie (for DPO)")
    a("--host", default="127.0.0.1", help="address to serve on; 0.0.0.0 shows the page to your whole network")
    a("--port", type=int, default=8765, help="port to serve on (0: any free port)")
    a("--generate", metavar="MODEL", help="first make images: a base pipeline (folder or hub id), or a trainer's out_dir")
    a("--prompts", help="with --generate: prompts file (.txt one a line, .jsonl/.csv with a prompt column)")
    a("--n", type=int, default=4, help="with --generate: images per prompt (seeds seed..seed+n-1)")
    a("--pretrained", help="with --generate and a LoRA out_dir: its base (default: the one it was trained from)")
    a("--steps", type=int, default=30, help="with --generate: denoising steps")
    a("--guidance", type=float, default=None, help="with --generate: classifier-free guidance scale (default: the family's, 7.5 for SD1.5 and SDXL)")
    a("--seed", type=int, default=0, help="with --generate: first seed")
    a("--resolution", type=int, help="with --generate: image side in pixels (default: the model's)")
    a("--batch_size", type=int, default=4, help="with --generate: images per pipeline call")
    a("--tag", help="with --generate: file-name prefix (default: the model folder's name)")
    a("--precision", choices=PRECISIONS, default="auto",
      help="with --generate: weights in fp32, sampled under bf16 autocast with bf16 (auto: bf16 on CUDA, fp32 on the CPU)")
    args = p.parse_args(argv)
    if args.generate:
        if not args.prompts:
            fail("--generate needs --prompts FILE (one prompt a line)")
        from sample import generate_folder  # torch and diffusers: only for --generate
        generate_folder(args.folder, args.generate, args.prompts, args.n, args.pretrained, args.steps, args.guidance,
                        args.seed, args.resolution, args.batch_size, args.tag, args.precision)
    elif not os.path.isdir(args.folder):
        fail(f"{args.folder} is not a folder (to make images into a new folder, pass --generate MODEL --prompts FILE)")
    t0 = time.time()
    folder_lock = lock_folder(args.folder)  # held while this process serves
    labels = Labels(args.folder, args.pairs)
    server = make_server(labels, args.host, args.port)
    state = labels.state()
    print(f"{state['total']} {'pairs' if args.pairs else 'images'} in {labels.root} ({state['done']} done; skipped "
          f"{labels.skip_line()}; read in {time.time() - t0:.2f} s)", flush=True)
    print(f"open {server.url} (Ctrl+C to stop; every decision is saved the moment you make it)", flush=True)
    lan = lan_address() if args.host in ("0.0.0.0", "") else None  # the printed address works on this machine only
    if lan:
        print(f"from another machine on your network: {server.url.replace('127.0.0.1', lan, 1)}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"\nstopped; labels are in {os.path.join(labels.root, PAIRS if args.pairs else METADATA)}")
    finally:
        folder_lock.close()


if __name__ == "__main__":
    main()
