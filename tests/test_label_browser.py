"""label.py's page in a real browser: headless Chromium (Debian's package) driven by Playwright. Labels with the
keyboard, undoes, reloads, and checks the files that train_kto.py's and train_dpo.py's loaders read. Skipped when
chromium or playwright is missing (.ci/run installs both). A few seconds.

    python -m pytest -q tests/test_label_browser.py
"""
import json
import os

import pytest
from PIL import Image

import public_data
import label
from test_label import Served, lines, make_folder

CHROMIUM = "/usr/bin/chromium"
# without the networking flags Chromium keeps calling home, which floods a closed network
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page_on(browser):
    servers, pages = [], []

    def open_page(folder, pairs=False):
        servers.append(Served(label.Labels(str(folder), pairs)))
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        page.goto(f"http://127.0.0.1:{servers[-1].port}/")
        pages.append(page)
        return page
    yield open_page
    for page in pages:
        page.close()
    for s in servers:
        s.close()


def press(page, key, done):
    """Press a key and wait until the page shows `done` decisions (so the next key goes to the next image)."""
    page.keyboard.press(key)
    page.wait_for_function(f"document.getElementById('progress').textContent.startsWith('{done} of')", timeout=5000)


def test_label_with_the_keyboard_undo_reload_and_train_kto_reads_it(tmp_path, page_on):
    folder = make_folder(tmp_path / "gens")
    page = page_on(folder)
    page.wait_for_selector("#images img")
    assert page.text_content("#caption") == "a blue ball"  # 001_0.png, the first image by path
    assert page.text_content("#progress").startswith("0 of 6 images done")
    assert page.eval_on_selector("#images img", "img => img.complete && img.naturalWidth") == 24  # the image loaded
    press(page, "l", 1)
    press(page, "ArrowLeft", 2)  # dislike
    press(page, "s", 3)
    press(page, "u", 2)  # undo the skip
    press(page, "d", 3)
    assert page.text_content("#progress") == "3 of 6 images done: 1 liked, 2 disliked, 0 skipped"
    page.reload()  # a reload (or a closed tab) continues where it stopped
    page.wait_for_function("document.getElementById('progress').textContent.startsWith('3 of')")
    assert page.get_attribute("#images img", "alt") == "002_1.png"
    press(page, "Backspace", 2)  # undo still works after the reload
    assert page.get_attribute("#images img", "alt") == "002_0.png"
    page.click("#buttons button.good")  # the Like button
    page.wait_for_function("document.getElementById('progress').textContent.startsWith('3 of')")

    assert lines(folder / "metadata.jsonl") == [
        {"file_name": "001_0.png", "text": "a blue ball", "label": "liked"},
        {"file_name": "001_1.png", "text": "a blue ball", "label": "disliked"},
        {"file_name": "002_0.png", "text": "a green cone", "label": "liked"}]
    fb = public_data.load_singles(str(folder))  # train_kto.py --data FOLDER
    assert len(fb) == 3 and fb.skipped == {} and fb.label.tolist() == [1, -1, 1]


def test_pairs_in_the_browser_and_train_dpo_reads_them(tmp_path, page_on):
    folder = make_folder(tmp_path / "gens")
    page = page_on(folder, pairs=True)
    page.wait_for_selector("#images img >> nth=1")
    assert page.text_content("#progress").startswith("0 of 3 pairs done")
    left, right = (page.get_attribute(f"#images img >> nth={k}", "alt") for k in (0, 1))
    press(page, "ArrowRight", 1)  # right is better
    press(page, "t", 2)  # a tie: counted, not a pair
    press(page, "1", 3)  # left is better
    assert page.text_content("#progress") == "3 of 3 pairs done: 2 decided, 1 ties, 0 skipped"
    assert "All done" in page.text_content("#caption")
    rows = lines(folder / "pairs.jsonl")
    assert len(rows) == 2 and rows[0]["chosen"] == right and rows[0]["rejected"] == left
    fb = public_data.load_pairs(str(folder / "pairs.jsonl"))  # train_dpo.py --data FOLDER/pairs.jsonl
    assert len(fb) == 2 and fb.skipped == {}
    journal = [json.loads(x) for x in open(folder / label.JOURNAL)]
    assert [r["choice"] for r in journal] == ["right", "tie", "left"]


def test_a_held_key_labels_one_image(tmp_path, page_on):
    """Holding `l` sends keydown after keydown (auto-repeat, event.repeat true): only the first labels, so images
    nobody looked at are never labelled."""
    folder = make_folder(tmp_path / "gens")
    page = page_on(folder)
    page.wait_for_selector("#images img")
    page.keyboard.down("l")
    page.wait_for_function("document.getElementById('progress').textContent.startsWith('1 of')", timeout=5000)
    for _ in range(4):  # still held: the browser repeats the key
        page.keyboard.down("l")
        page.wait_for_timeout(250)
    page.keyboard.up("l")
    assert page.text_content("#progress").startswith("1 of 6 images done")
    assert len(lines(folder / "metadata.jsonl")) == 1


def test_skipped_images_come_back_and_the_page_lists_what_it_does_not_show(tmp_path, page_on):
    folder = make_folder(tmp_path / "gens")
    Image.new("RGB", (8, 8)).save(folder / "bare.png")  # no prompt: not shown
    page = page_on(folder)
    page.wait_for_selector("#images img")
    assert page.query_selector("#unskip") is None  # nothing skipped yet
    press(page, "s", 1)
    press(page, "l", 2)
    press(page, "s", 3)
    assert page.get_attribute("#images img", "alt") == "002_1.png"
    page.click("#unskip")  # "Show the 2 skipped again"
    page.wait_for_function("document.getElementById('progress').textContent.startsWith('1 of')")
    assert page.get_attribute("#images img", "alt") == "001_0.png"  # the first skipped image, shown again
    assert page.query_selector("#unskip") is None
    assert page.text_content("#skipped") == "not shown: 1 images without a prompt (no .txt beside it, none in the PNG)"
    page.click("#skipped")  # opens the list of names
    page.wait_for_selector("#notshownlist li")
    assert page.text_content("#notshownlist") == "bare.png: images without a prompt (no .txt beside it, none in the PNG)"
    assert page.is_visible("#buttons button.good")  # the list does not hide the buttons


def test_another_page_cannot_frame_the_labelling_page(tmp_path, browser):
    """A decoy page that frames the labelling page (and places its own button over Like) gets an empty frame:
    the page is sent with X-Frame-Options DENY and CSP frame-ancestors 'none'."""
    served = Served(label.Labels(str(make_folder(tmp_path / "gens")), False))
    page = browser.new_page()
    try:
        url = f"http://127.0.0.1:{served.port}/"
        page.set_content(f'<iframe src="{url}" width="900" height="600"></iframe>')
        page.wait_for_timeout(1500)
        framed = [f for f in page.frames if f != page.main_frame]
        assert framed and all(f.query_selector("#progress") is None for f in framed)
        page.goto(url)  # opened directly it works
        page.wait_for_selector("#progress")
    finally:
        page.close()
        served.close()


def test_served_to_the_network_the_printed_address_works_and_the_bare_one_does_not(tmp_path, browser):
    import threading
    folder = make_folder(tmp_path / "gens")
    server = label.make_server(label.Labels(str(folder), False), "0.0.0.0", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    page = browser.new_page()
    try:
        bare = server.url.split("?")[0]
        assert page.goto(bare).status == 403  # someone on the network without the printed address
        page.goto(server.url)  # the printed address: the page, its state and images through the key's cookie
        page.wait_for_selector("#images img")
        assert page.eval_on_selector("#images img", "img => img.complete && img.naturalWidth") == 24
        press(page, "l", 1)
        page.goto(bare)  # the cookie now stands for the key
        page.wait_for_function("document.getElementById('progress').textContent.startsWith('1 of')")
        assert len(lines(folder / "metadata.jsonl")) == 1
    finally:
        page.close()
        server.shutdown()
        server.server_close()


def test_buttons_follow_the_arrow_keys_and_a_long_prompt_never_hides_them(tmp_path, browser):
    """On a 1366 x 768 screen: Dislike (left arrow) left of Like (right arrow), the buttons in the window however long
    the prompt, and each image a link to itself at full size."""
    folder = make_folder(tmp_path / "gens", prompts=("a castle on a hill, " * 120,))
    served = Served(label.Labels(str(folder), False))
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    try:
        page.goto(f"http://127.0.0.1:{served.port}/")
        page.wait_for_selector("#images img")
        names = page.eval_on_selector_all("#buttons button", "bs => bs.map(b => b.textContent.split(' ')[0])")
        assert names[:2] == ["Dislike", "Like"]
        box = page.locator("#buttons").bounding_box()
        assert box["y"] + box["height"] <= 768, box
        assert page.get_attribute("#images a", "href") == page.get_attribute("#images img", "src")
        page.keyboard.press("ArrowLeft")  # the left arrow is the left button's: dislike
        page.wait_for_function("document.getElementById('progress').textContent.startsWith('1 of')")
        assert lines(folder / "metadata.jsonl")[0]["label"] == "disliked"
    finally:
        page.close()
        served.close()
