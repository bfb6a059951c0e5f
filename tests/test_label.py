"""label.py over HTTP: what it serves and refuses, what it writes and that the trainers' loaders read it, that a
kill and a restart lose nothing, and the loop generate -> label -> train_kto.py -> generate with the LoRA.

    python -m pytest -q tests/test_label.py
"""
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest
from PIL import Image, PngImagePlugin

import public_data
import label
import sample
from conftest import ROOT


def make_folder(root, prompts=("a red cube", "a blue ball", "a green cone"), per_prompt=2):
    """An A1111-style output folder: PNGs with their prompt in the `parameters` chunk, one in a dated subfolder."""
    for i, prompt in enumerate(prompts):
        for s in range(per_prompt):
            sub = root / ("2024-05-01" if i == 0 else "")
            sub.mkdir(parents=True, exist_ok=True)
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", f"{prompt}\nNegative prompt: blurry\nSteps: 20, Seed: {s}")
            Image.new("RGB", (24, 24), (40 * i, 80 * s, 100)).save(sub / f"{i:03d}_{s}.png", pnginfo=info)
    return root


class Served:
    """label.py's server on a free port in a thread, and a raw HTTP client that sends paths exactly as given."""

    def __init__(self, labels):
        self.server = label.make_server(labels, "127.0.0.1", 0)
        self.port = self.server.server_address[1]
        self.token = self.server.RequestHandlerClass.token
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers or {})
        r = conn.getresponse()
        payload = r.read()
        conn.close()
        return r.status, payload

    def post(self, path, body, token=True):
        status, payload = self.request("POST", path, body, {"X-Label-Token": self.token} if token is True else
                                       ({"X-Label-Token": token} if token else {}))
        return status, json.loads(payload)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def served(tmp_path):
    servers = []

    def start(folder, pairs=False):
        servers.append(Served(label.Labels(str(folder), pairs)))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------------------
# what it serves

def test_serves_only_the_images_found_inside_the_folder(tmp_path, served):
    folder = make_folder(tmp_path / "gens")
    (tmp_path / "secret.png").write_bytes(b"not yours")
    os.symlink(tmp_path / "secret.png", folder / "link.png")  # inside the folder, pointing out of it
    (folder / "000_0.txt").write_text("a red cube")  # a sidecar is not an image: not served either
    s = served(folder)
    status, body = s.request("GET", "/img/2024-05-01/000_0.png")
    assert status == 200 and body == (folder / "2024-05-01" / "000_0.png").read_bytes()
    assert s.request("GET", "/img/001_1.png")[0] == 200
    for path in ["/img/../secret.png", "/img/%2e%2e/secret.png", "/img/%2E%2E%2Fsecret.png", "/img/..%2fsecret.png",
                 f"/img/{tmp_path}/secret.png", f"/img/{str(tmp_path).replace('/', '%2F')}%2Fsecret.png",
                 "/img/link.png", "/img/000_0.txt", "/img/2024-05-01/../../secret.png", "/../secret.png", "/secret.png"]:
        status, body = s.request("GET", path)
        assert status == 404 and b"not yours" not in body, path
    assert s.request("GET", "/", headers={"Host": "evil.example:80"})[0] == 403  # DNS rebinding: another site's name


def test_writes_need_this_runs_token(tmp_path, served):
    folder = make_folder(tmp_path / "gens")
    s = served(folder)
    status, page = s.request("GET", "/")
    assert status == 200 and s.token.encode() in page  # the page carries it...
    item = ["001_0.png"]
    for token in (None, "wrong-" + s.token):  # ...and a write without it is refused, and writes nothing
        status, reply = s.post("/api/decide", {"item": item, "choice": "liked"}, token=token)
        assert status == 403 and "token" in reply["error"]
        assert s.post("/api/undo", {}, token=token)[0] == 403
    assert not (folder / "metadata.jsonl").exists()
    status, reply = s.post("/api/decide", {"item": ["2024-05-01/000_0.png"], "choice": "liked"})
    assert status == 200 and reply["counts"]["liked"] == 1 and reply["item"]["files"] == ["001_0.png"]
    status, reply = s.post("/api/decide", {"item": ["2024-05-01/000_1.png"], "choice": "maybe"})
    assert status == 400 and reply["error"] == "unknown label 'maybe': expected one of liked, disliked, skip"
    status, reply = s.post("/api/decide", {"item": ["../secret.png"], "choice": "liked"})
    assert status == 400 and "not an image" in reply["error"]
    assert lines(folder / "metadata.jsonl") == [{"file_name": "2024-05-01/000_0.png", "text": "a red cube", "label": "liked"}]


# ------------------------------------------------------------------------------------------------
# what it writes, and that it survives a restart

def test_labels_survive_a_restart_undo_works_across_it_and_train_kto_reads_them(tmp_path):
    folder = make_folder(tmp_path / "gens")
    labels = label.Labels(str(folder), pairs=False)
    order = [item[0] for item in labels.items]
    assert labels.state()["item"]["files"] == [order[0]] and labels.state()["total"] == 6
    for f, choice in zip(order, ["liked", "disliked", "skip", "liked"]):
        assert labels.decide([f], choice) is None
    with open(folder / label.JOURNAL, "a") as f:
        f.write('{"item": ["001_1.png"], "cho')  # a kill in the middle of an append: the torn line is ignored

    labels = label.Labels(str(folder), pairs=False)  # a restart
    state = labels.state()
    assert state["done"] == 4 and state["item"]["files"] == [order[4]]
    assert state["counts"] == {"liked": 2, "disliked": 1, "skip": 1}
    assert labels.undo() is None and labels.state()["item"]["files"] == [order[3]]  # undoes the last before the restart
    assert labels.decide([order[3]], "disliked") is None
    assert labels.decide([order[3]], "liked") == "already decided (in another tab?): showing the next one"

    rows = {r["file_name"]: r for r in lines(folder / "metadata.jsonl")}
    assert {f: r["label"] for f, r in rows.items()} == {order[0]: "liked", order[1]: "disliked", order[3]: "disliked"}
    fb = public_data.load_singles(str(folder))  # what train_kto.py --data FOLDER reads
    assert len(fb) == 3 and fb.skipped == {} and sorted(fb.label.tolist()) == [-1, -1, 1]
    assert {fb.captions[c] for c in fb.caption_idx} == {rows[f]["text"] for f in rows}
    assert not any(n.endswith(".tmp") or ".tmp" in n for n in os.listdir(folder))  # no temporary file left behind
    assert sorted(os.listdir(folder / "2024-05-01")) == ["000_0.png", "000_1.png"]  # images untouched


def test_served_to_the_network_it_needs_the_printed_key_and_a_host_naming_this_machine(tmp_path):
    """--host 0.0.0.0: a page whose own domain resolves to this machine (DNS rebinding) sends that domain as Host:
    403; someone else on the network without the printed address (its ?key=): 403, for the page, the state, the
    images and the writes; the printed address works and its page keeps the key in a same-site cookie."""
    labels = label.Labels(str(make_folder(tmp_path / "gens")), False)
    server = label.make_server(labels, "0.0.0.0", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port, handler = server.server_address[1], server.RequestHandlerClass
    key, token = handler.key, handler.token

    def ask(method, path, host, cookie=None, body=None, tok=None):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"Host": host, **({"Cookie": cookie} if cookie else {}), **({"X-Label-Token": tok} if tok else {})}
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        r = conn.getresponse()
        r.read()
        conn.close()
        return r.status, r.getheader("Set-Cookie") or ""
    try:
        assert server.url.endswith(f":{port}/?key={key}") and len(key) >= 16
        here, cookie = f"192.168.1.20:{port}", f"label_key={key}"
        assert ask("GET", f"/?key={key}", f"evil.example:{port}")[0] == 403  # DNS rebinding, even with the key
        assert ask("GET", "/", here)[0] == 403 and ask("GET", "/api/state", here)[0] == 403  # no key
        image = "/img/" + labels.items[0][0]
        assert ask("GET", image, here)[0] == 403 and ask("GET", image, here, cookie)[0] == 200
        status, set_cookie = ask("GET", f"/?key={key}", here)
        assert status == 200 and f"label_key={key}" in set_cookie and "SameSite=Strict" in set_cookie
        assert ask("GET", "/api/state", here, cookie)[0] == 200 and ask("GET", "/api/state", f"localhost:{port}", cookie)[0] == 200
        decide = {"item": labels.items[0], "choice": "liked"}
        assert ask("POST", "/api/decide", here, body=decide, tok=token)[0] == 403  # the token alone is not enough
        assert ask("POST", "/api/decide", here, "label_key=wrong", body=decide, tok=token)[0] == 403
        assert ask("POST", "/api/decide", here, cookie, body=decide, tok=token)[0] == 200
        assert labels.state()["done"] == 1
    finally:
        server.shutdown()
        server.server_close()


def test_a_write_cut_short_does_not_swallow_the_next_label(tmp_path):
    """A full disk cut a journal append after a few bytes; the label retried once there is room is appended on a
    line of its own, so a restart reads it (it used to be glued to the fragment and dropped with it)."""
    folder = make_folder(tmp_path / "gens")
    labels = label.Labels(str(folder), pairs=False)
    first, second = labels.items[0], labels.items[1]
    assert labels.decide(first, "liked") is None
    with open(folder / label.JOURNAL, "ab") as f:
        f.write(b'{"item": ["' + second[0].encode() + b'"], "cho')  # what the cut write left
    assert labels.decide(second, "disliked") is None  # the retry
    assert [(d["item"], d["choice"]) for d in label.Labels(str(folder), pairs=False).decisions] == \
        [(first, "liked"), (second, "disliked")]


def test_malformed_requests_and_a_failed_write_get_an_answer(tmp_path, monkeypatch, capsys):
    import errno
    served = Served(label.Labels(str(make_folder(tmp_path / "gens")), False))
    try:
        assert served.request("GET", "/img/a%00b.png")[0] == 400  # a NUL byte in the path
        assert served.post("/api/decide", "[" * 30000)[0] == 400  # JSON nested past the parser's depth
        assert served.request("POST", "/api/undo", {}, {"X-Label-Token": "t\u00e9st"})[0] == 403  # a non-ASCII token
        item = served.server.RequestHandlerClass.labels.items[0]

        def full_disk(self, record):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(label.Labels, "append", full_disk)
        status, state = served.post("/api/decide", {"item": item, "choice": "liked"})
        assert status == 500 and "No space left on device" in state["error"] and state["done"] == 0
        monkeypatch.undo()
        assert served.post("/api/decide", {"item": item, "choice": "liked"})[0] == 200  # room again: it records
        printed = capsys.readouterr().out
        assert "label.py: could not save: No space left on device" in printed and "Traceback" not in printed
    finally:
        served.close()


def test_a_second_server_on_the_same_folder_stops_with_one_line(tmp_path):
    folder = make_folder(tmp_path / "gens")
    held = label.lock_folder(str(folder))  # what main() takes before it reads the journal
    with pytest.raises(SystemExit, match="another label.py is already serving"):
        label.lock_folder(str(folder))
    held.close()  # the first server stops (the kernel releases its lock however it ends)
    label.lock_folder(str(folder)).close()
    assert label.LOCK not in label.Labels(str(folder), pairs=False).files  # a dot-file: never an image to label


def test_undo_stays_in_its_mode(tmp_path):
    """Singles labelled, then --pairs opened on the same folder: nothing of pairs' to undo (the button is off),
    and an undo there never takes back a single-image like, also after a restart replays the journal."""
    folder = make_folder(tmp_path / "gens")
    singles = label.Labels(str(folder), pairs=False)
    first, second = singles.items[0], singles.items[1]
    assert singles.decide(first, "liked") is None and singles.decide(second, "disliked") is None
    pairs = label.Labels(str(folder), pairs=True)
    assert pairs.state()["can_undo"] is False and pairs.undo() == "nothing to undo"
    assert pairs.decide(pairs.items[0], "left") is None and pairs.state()["can_undo"] is True
    assert pairs.undo() is None and pairs.undo() == "nothing to undo"
    assert [d["item"] for d in label.Labels(str(folder), pairs=False).decisions] == [first, second]
    singles = label.Labels(str(folder), pairs=False)
    assert singles.undo() is None  # the last single-image decision, the dislike
    assert {r["file_name"]: r["label"] for r in lines(folder / "metadata.jsonl")} == {first[0]: "liked"}


def test_pairs_mode_writes_what_train_dpo_reads_and_counts_ties(tmp_path):
    folder = make_folder(tmp_path / "gens", per_prompt=3)  # 3 images a prompt: one pair each, one image left over
    make_folder(tmp_path / "gens" / "lonely", prompts=("only one image",), per_prompt=1)
    labels = label.Labels(str(folder), pairs=True)
    assert len(labels.items) == 3 and all(labels.captions[a] == labels.captions[b] for a, b in labels.items)
    (a0, b0), (a1, b1), (a2, b2) = labels.items
    for item, choice in zip(labels.items, ["left", "right", "tie"]):
        assert labels.decide(item, choice) is None
    assert labels.decide([a0, b0], "liked") == "unknown label 'liked': expected one of left, right, tie, skip"
    assert lines(folder / "pairs.jsonl") == [{"caption": labels.captions[a0], "chosen": a0, "rejected": b0},
                                             {"caption": labels.captions[a1], "chosen": b1, "rejected": a1}]
    fb = public_data.load_pairs(str(folder / "pairs.jsonl"))  # what train_dpo.py --data FOLDER/pairs.jsonl reads
    assert len(fb) == 2 and fb.skipped == {}
    assert [os.path.relpath(fb.paths[w], folder) for w in fb.winner] == [a0, b1]
    state = label.Labels(str(folder), pairs=True).state()
    assert state["counts"] == {"left": 1, "right": 1, "tie": 1, "skip": 0} and state["item"] is None
    assert not (folder / "metadata.jsonl").exists()  # pairs only: no empty metadata.jsonl to hide other labels


def test_keeps_labels_and_captions_the_folder_already_has(tmp_path):
    folder = tmp_path / "mine"
    for name in ["liked/a.png", "disliked/b.png", "c.png", "d.png"]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(folder / name)  # no prompt inside: captions come from the files below
    for name in ["liked/a", "disliked/b"]:
        (folder / f"{name}.txt").write_text(f"caption of {name}")
    old = [{"file_name": "c.png", "text": "caption of c", "label": "liked"}, {"file_name": "d.png", "caption": "caption of d"},
           {"file_name": "gone.png", "text": "deleted since", "label": "disliked"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    labels = label.Labels(str(folder), pairs=False)
    assert labels.state()["item"]["files"] == ["d.png"] and labels.state()["item"]["caption"] == "caption of d"
    assert lines(folder / "metadata.before-label.jsonl") == old  # the user's file, kept as it was
    labels.decide(["d.png"], "disliked")
    labels = label.Labels(str(folder), pairs=False)  # the captions of the kept file are still read after a restart
    fb = public_data.load_singles(str(folder))
    got = {os.path.basename(fb.paths[i]): (fb.captions[c], int(y)) for i, c, y in zip(fb.image, fb.caption_idx, fb.label)}
    assert got == {"a.png": ("caption of liked/a", 1), "b.png": ("caption of disliked/b", -1),
                   "c.png": ("caption of c", 1), "d.png": ("caption of d", -1)}
    assert fb.skipped == {"missing file": 1}  # its label is carried over too, and the trainer says it is gone


def test_a_copy_without_dot_files_keeps_every_label(tmp_path):
    """`cp -r src/* dst/` leaves the journal (.label_journal.jsonl) behind, or it is deleted as junk, while
    metadata.before-label.jsonl is there: the next start keeps the labels of metadata.jsonl too (5 stay 5; it used
    to rebuild metadata.jsonl from the backup alone: 2)."""
    import shutil
    src = make_folder(tmp_path / "src")
    first_two = [{"file_name": "001_0.png", "text": "a blue ball", "label": "liked"},
                 {"file_name": "001_1.png", "text": "a blue ball", "label": "disliked"}]
    (src / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first_two))  # not label.py's
    labels = label.Labels(str(src), pairs=False)
    rest = [item for item in labels.items if item[0] not in ("001_0.png", "001_1.png")]
    for item, choice in zip(rest, ["liked", "disliked", "liked"]):
        assert labels.decide(item, choice) is None
    assert len(lines(src / "metadata.jsonl")) == 5
    dst = tmp_path / "dst"
    dst.mkdir()
    for name in os.listdir(src):  # the shell's * skips dot-files
        if not name.startswith("."):
            (shutil.copytree if (src / name).is_dir() else shutil.copy2)(src / name, dst / name)
    assert not (dst / label.JOURNAL).exists() and (dst / "metadata.before-label.jsonl").exists()
    assert len(label.Labels(str(dst), pairs=False).decisions) == 5
    assert {r["file_name"]: r["label"] for r in lines(dst / "metadata.jsonl")} == \
        {r["file_name"]: r["label"] for r in lines(src / "metadata.jsonl")}
    # a carried label undone, then the journal lost: it stays undone (the backup still holds it)
    labels = label.Labels(str(src), pairs=False)
    while labels.decisions:  # all five undone, the two carried ones included
        assert labels.undo() is None
    assert labels.decide(["001_0.png"], "disliked") is None  # 001_0 changed, 001_1 left undone
    os.remove(src / label.JOURNAL)
    assert {r["file_name"]: r["label"] for r in lines(src / "metadata.jsonl")} == {"001_0.png": "disliked"}
    restarted = label.Labels(str(src), pairs=False)
    assert {tuple(d["item"]): d["choice"] for d in restarted.decisions} == {("001_0.png",): "disliked"}


def test_carried_pairs_are_shown_as_decided_whichever_side_they_are_on(tmp_path):
    """A pairs.jsonl the journal did not write stores [chosen, rejected]; the page shows a pair in its own (hashed)
    order. The carried decision is recorded as the page's left or right, so the pair counts as done and is not
    offered again (one click then gave A > B beside B > A)."""
    folder = make_folder(tmp_path / "gens")
    shown = label.Labels(str(make_folder(tmp_path / "scratch")), pairs=True).items  # the same names, the same order
    a, b = shown[0]  # shown as a on the left, b on the right
    (folder / "pairs.jsonl").write_text(json.dumps({"caption": "x", "chosen": b, "rejected": a}) + "\n")
    labels = label.Labels(str(folder), pairs=True)
    assert labels.state()["done"] == 1 and labels.state()["item"]["files"] != [a, b]
    assert labels.decisions == [{"item": [a, b], "choice": "right"}]
    assert [(r["chosen"], r["rejected"]) for r in lines(folder / "pairs.jsonl")] == [(b, a)]


def test_a_link_to_the_journal_is_not_served_and_kill_leftovers_are_cleared(tmp_path):
    folder = make_folder(tmp_path / "gens")
    label.Labels(str(folder), pairs=False).decide(["001_0.png"], "liked")
    os.symlink(folder / label.JOURNAL, folder / "x.png")  # an "image" that is the journal
    (folder / "x.txt").write_text("a prompt beside it")
    (folder / "metadata.jsonl.tmp4242").write_text("half")  # what a kill during a rewrite leaves
    labels = label.Labels(str(folder), pairs=False)
    assert "x.png" not in labels.files and labels.skipped["links to something not an image"] == 1
    assert not (folder / "metadata.jsonl.tmp4242").exists()
    s = Served(labels)
    try:
        assert s.request("GET", "/img/x.png")[0] == 404
    finally:
        s.close()


# ------------------------------------------------------------------------------------------------
# bad input: one clear line, or a counted skip

def test_bad_input_gets_one_line_or_a_counted_skip(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"^error: no images \(png, jpg, jpeg, webp\) in .*empty$"):
        label.Labels(str(tmp_path / "empty"), pairs=False)
    assert os.listdir(tmp_path / "empty") == []  # a failed start writes nothing
    with pytest.raises(SystemExit, match="is not a folder"):
        label.main([str(tmp_path / "nowhere")])
    folder = make_folder(tmp_path / "gens", prompts=("one prompt",), per_prompt=1)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    Image.new("RGB", (8, 8)).save(folder / "bare.png")  # no prompt anywhere
    labels = label.Labels(str(folder), pairs=False)
    assert labels.files == ["2024-05-01/000_0.png"]
    assert labels.state()["skipped"] == "1 images without a prompt (no .txt beside it, none in the PNG), 1 unreadable images"
    with pytest.raises(SystemExit, match="--pairs needs 2 or more images per prompt"):
        label.Labels(str(folder), pairs=True)
    (folder / label.JOURNAL).unlink()
    (folder / label.JOURNAL).mkdir()  # a file label.py cannot write (chmod would not stop root)
    with pytest.raises(SystemExit, match=r"^error: cannot write into .*gens \(Is a directory\): label.py keeps its labels there$"):
        label.Labels(str(folder), pairs=False)
    (folder / label.JOURNAL).rmdir()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        with pytest.raises(SystemExit, match=rf"^error: port {busy.getsockname()[1]} on 127.0.0.1 is in use"):
            label.make_server(labels, "127.0.0.1", busy.getsockname()[1])
    finally:
        busy.close()
    with pytest.raises(SystemExit, match="needs --prompts"):
        label.main([str(folder), "--generate", str(folder)])
    with pytest.raises(SystemExit, match="not a pipeline folder"):
        label.main([str(folder), "--generate", str(folder), "--prompts", str(folder / "bare.png")])


# ------------------------------------------------------------------------------------------------
# the whole loop, as a user runs it: generate -> label -> train_kto.py -> generate with the LoRA -> label

def start_cli(*args):
    """label.py in its own process; returns (process, address) once it prints the address."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "label.py"), *args, "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    out = []
    for line in proc.stdout:
        out.append(line)
        if line.startswith("open http://"):
            return proc, re.search(r"http://127\.0\.0\.1:(\d+)/", line).group(1)
    raise AssertionError("label.py stopped before serving:\n" + "".join(out))


def call(port, method, path, body=None, token=None):
    conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=30)
    conn.request(method, path, None if body is None else json.dumps(body), {"X-Label-Token": token} if token else {})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    return r.status, payload


def test_generate_label_train_generate_with_the_lora(tmp_path, tiny_pipe_dir):
    import train_kto
    folder, out = tmp_path / "likes", tmp_path / "kto"
    (tmp_path / "prompts.txt").write_text("a red square\na blue circle\n")
    proc, port = start_cli(str(folder), "--generate", tiny_pipe_dir, "--prompts", str(tmp_path / "prompts.txt"),
                           "--n", "2", "--steps", "2", "--tag", "base")
    try:
        token = re.search(r'TOKEN = "([^"]+)"', call(port, "GET", "/")[1].decode()).group(1)
        state = json.loads(call(port, "GET", "/api/state")[1])
        assert state["total"] == 4 and state["item"]["caption"] == "a red square"
        for choice in ["liked", "liked", "disliked", "disliked"]:
            status, body = call(port, "POST", "/api/decide", {"item": state["item"]["files"], "choice": choice}, token)
            assert status == 200, body
            state = json.loads(body)
        assert state["item"] is None and state["counts"] == {"liked": 2, "disliked": 2, "skip": 0}
    finally:
        proc.send_signal(signal.SIGKILL)  # the hard way: nothing may be lost
        proc.wait()
    assert sorted(os.listdir(folder)) == [".label.lock", ".label_journal.jsonl", "base_00000_s0.png", "base_00000_s1.png",
                                          "base_00001_s0.png", "base_00001_s1.png", "metadata.jsonl"]
    assert [r["label"] for r in lines(folder / "metadata.jsonl")] == ["liked", "liked", "disliked", "disliked"]

    train_kto.main(["--pretrained", tiny_pipe_dir, "--data", str(folder), "--out_dir", str(out), "--lora_rank", "4",
                    "--max_steps", "1", "--global_batch", "2", "--resolution", "32", "--val_every", "-1",
                    "--cache_dir", str(tmp_path / "cache"), "--warmup_steps", "0", "--lr", "1e-4"])
    assert (out / "pytorch_lora_weights.safetensors").exists()

    # the base is read from the run's own checkpoint: the LoRA out_dir alone is enough
    proc, port = start_cli(str(folder), "--generate", str(out), "--prompts", str(tmp_path / "prompts.txt"),
                           "--n", "1", "--steps", "2")
    try:
        state = json.loads(call(port, "GET", "/api/state")[1])
        assert state["total"] == 6 and state["done"] == 4 and state["item"]["files"] == ["kto_00000_s0.png"]
        assert state["item"]["caption"] == "a red square"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_generate_with_an_sdxl_base_writes_prompts_data_reads_back(tmp_path, tiny_sdxl_dir):
    (tmp_path / "prompts.txt").write_text("a red square, studio light\n")
    sample.generate_folder(str(tmp_path / "gens"), tiny_sdxl_dir, str(tmp_path / "prompts.txt"), n=2, steps=2, tag="xl")
    labels = label.Labels(str(tmp_path / "gens"), pairs=True)
    assert sorted(labels.items[0]) == ["xl_00000_s0.png", "xl_00000_s1.png"] and len(labels.items) == 1
    assert labels.captions["xl_00000_s0.png"] == "a red square, studio light"


# ------------------------------------------------------------------------------------------------
# the page without torch, a decision's cost, skipped images again, what is not shown and why

def test_the_page_loads_without_torch():
    """Only --generate needs torch (1.6 s and 228 MB to import): label.py itself imports PIL and numpy."""
    out = subprocess.run([sys.executable, "-c", "import sys, label; print(sorted(m for m in ('torch', 'diffusers', "
                          "'transformers') if m in sys.modules))"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_decision_appends_its_line_and_a_failed_append_leaves_the_file_whole(tmp_path, monkeypatch):
    """With 5000 decisions made a decision still writes one line: metadata.jsonl is appended to (the same file, not
    a new one renamed over it), rewritten whole only at a start and after an undo."""
    folder = make_folder(tmp_path / "gens", prompts=tuple(f"prompt {i}" for i in range(5)), per_prompt=2)
    labels = label.Labels(str(folder), pairs=False)
    files = [item[0] for item in labels.items]
    assert labels.decide([files[0]], "liked") is None
    meta = folder / "metadata.jsonl"
    inode = os.stat(meta).st_ino
    for f in files[1:4]:
        assert labels.decide([f], "disliked") is None
    assert os.stat(meta).st_ino == inode and [r["file_name"] for r in lines(meta)] == files[:4]
    real_write = os.write

    def full_disk(fd, data):  # the journal's line fits; half of metadata.jsonl's does, then the disk is full
        if not os.readlink(f"/proc/self/fd/{fd}").endswith("metadata.jsonl"):
            return real_write(fd, data)
        real_write(fd, data[:len(data) // 2])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "write", full_disk)
    error = labels.decide([files[4]], "liked")
    monkeypatch.setattr(os, "write", real_write)
    assert error.startswith("saved in the journal, but metadata.jsonl could not be updated (No space left on device)")
    assert [r["file_name"] for r in lines(meta)] == files[:4]  # whole: the half line was cut back
    assert label.decisions_in(str(folder))[files[4]] == "liked"  # the journal has it
    assert labels.decide([files[5]], "liked") is None  # the next decision rewrites the file whole from the journal
    assert [r["file_name"] for r in lines(meta)] == files[:6]
    assert labels.undo() is None and [r["file_name"] for r in lines(meta)] == files[:5]
    assert label.Labels(str(folder), pairs=False).state()["done"] == 5


def test_skipped_images_can_be_shown_again(tmp_path, served):
    folder = make_folder(tmp_path / "gens")
    s = served(folder)
    first = json.loads(s.request("GET", "/api/state")[1])
    a = first["item"]["files"]
    s.post("/api/decide", {"item": a, "choice": "skip"})
    b = s.post("/api/decide", {"item": first["next"]["files"], "choice": "liked"})[1]
    c = s.post("/api/decide", {"item": b["item"]["files"], "choice": "skip"})[1]
    assert c["counts"]["skip"] == 2 and c["done"] == 3
    status, again = s.post("/api/unskip", {})
    assert status == 200 and again["counts"]["skip"] == 0 and again["done"] == 1
    assert again["item"]["files"] == a  # back in the queue, in the folder's order
    assert s.post("/api/unskip", {})[1]["error"] == "nothing skipped"
    s.close()
    restarted = label.Labels(str(folder), pairs=False).state()  # the journal keeps the unskip
    assert restarted["done"] == 1 and restarted["item"]["files"] == a


def test_every_image_not_shown_is_listed_with_why(tmp_path, served):
    folder = make_folder(tmp_path / "gens", per_prompt=3)  # pairs: the third image of each prompt has no partner
    Image.new("RGB", (8, 8)).save(folder / "bare.png")
    whole = (folder / "001_0.png").read_bytes()
    (folder / "001_9.png").write_bytes(whole[:len(whole) - 20])  # a save still running: its header reads
    s = served(folder, pairs=True)
    state = json.loads(s.request("GET", "/api/state")[1])
    listed = {row["file"]: row["why"] for row in json.loads(s.request("GET", "/api/not_shown")[1])}
    assert state["not_shown"] == len(listed) == 5
    assert listed["bare.png"].startswith("images without a prompt")
    assert listed["001_9.png"].startswith("incomplete images")
    assert sorted(f for f, why in listed.items() if why.startswith("images without a partner")) == \
        ["001_2.png", "002_2.png", "2024-05-01/000_2.png"]
