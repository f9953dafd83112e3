"""`biovita serve` on Ray Serve: the page driven in a real headless Chromium, the JSON routes,
and bad requests that get a 4xx and leave the service serving."""

from __future__ import annotations

import io
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from biovita.data.store import read_table
from biovita.serve.client import post

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(synth_store, tiny_model, tmp_path_factory, ray_local):
    """A tiny model that knows the store's taxa, served with the store as its gallery."""
    from ray import serve

    from biovita.models.checkpoint import save_model
    from biovita.serve.app import ServeConfig, start

    root, _ = synth_store
    taxa = read_table(root, "taxa", ["class", "order", "family", "genus", "scientific_name",
                                     "common_name"]).to_pylist()
    ckpt = tmp_path_factory.mktemp("serve") / "model"
    save_model(tiny_model, ckpt, metadata={"taxa": taxa})
    files = tmp_path_factory.mktemp("media")
    pick = {}
    for table, fmt in (("audio", "wav"), ("image", "png")):
        row = next(r for r in read_table(root, table, ["id", "bytes", "format"]).to_pylist()
                   if r["format"] == fmt and not r["id"].startswith("bad"))
        pick[table] = files / f"{row['id']}.{fmt}"
        pick[table].write_bytes(row["bytes"])
    cfg = ServeConfig(checkpoint=str(ckpt), gallery=str(root), port=_port(), max_upload_mb=1.0,
                      cpus_per_replica=0.5)
    url = start(cfg)
    yield url, str(ckpt), pick, cfg
    serve.shutdown()


def test_routes_answer_and_gallery_is_cached(served, synth_store):
    url, ckpt, pick, _ = served
    from biovita.predict import Predictor

    status, res = post(url + "identify", {"rank": "genus", "k": "3"},
                       (pick["audio"].name, pick["audio"].read_bytes()))
    assert status == 200 and res["modality"] == "audio" and len(res["taxa"]) == 3
    want = Predictor(ckpt).predict([str(pick["audio"])], rank="genus", k=3)
    assert [t["genus"] for t in res["taxa"]] == [w["genus"] for w in want]
    assert [t["probability"] for t in res["taxa"]] == pytest.approx([w["probability"] for w in want], rel=1e-4)
    status, res = post(url + "search", {"text": "Aves", "k": "4"})
    assert status == 200 and res["modality"] == "text"
    assert len(res["nearest"]["audio"]) == 4 and len(res["nearest"]["image"]) == 4
    item = res["nearest"]["image"][0]
    with urllib.request.urlopen(url + item["media"].lstrip("/")) as r:
        assert r.headers["Content-Type"].startswith("image/") and len(r.read()) > 100
    root, _ = synth_store
    cached = {p.name.split("-")[0] for p in (Path(root) / "_embeddings").glob("*.parquet")}
    assert {"audio", "image"} <= cached  # computed once, beside the store
    with urllib.request.urlopen(url + "health") as r:
        g = json.loads(r.read())["gallery"]
    n_audio = len(read_table(root, "audio", ["id"]))
    assert 0 < g["audio"] < n_audio  # the undecodable clips are not in the gallery


def test_bad_requests_get_4xx_and_the_service_keeps_serving(served):
    from PIL import Image

    from biovita.data.synth_media import _png_bomb

    url, _, pick, cfg = served
    big = b"RIFF" + b"\0" * int(1.2 * 2**20)
    cases = [
        ("text.txt", b"just some text, not a recording", {}, 415, "not_media"),
        ("page.mp3", b"<!DOCTYPE html><html><body>404</body></html>", {}, 415, "html_page"),
        ("empty.wav", b"", {}, 400, "empty_file"),
        ("huge.wav", big, {}, 413, "too_large"),
        ("bomb.png", _png_bomb(), {}, 413, "too_large"),
        ("cut.wav", pick["audio"].read_bytes()[:40], {}, 422, "undecodable"),
        (pick["audio"].name, pick["audio"].read_bytes(), {"rank": "kingdom"}, 422, "unknown_rank"),
        (pick["audio"].name, pick["audio"].read_bytes(), {"k": "0"}, 422, "bad_k"),
    ]
    for name, data, fields, code, reason in cases:
        status, res = post(url + "identify", fields, (name, data))
        assert (status, res.get("error")) == (code, reason), (name, status, res)
        assert res["message"]
    status, res = post(url + "search", {})
    assert (status, res["error"]) == (400, "no_query")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, "PNG")
    status, res = post(url + "identify", {"k": "2"}, ("ok.png", buf.getvalue()))
    assert status == 200 and res["modality"] == "image" and len(res["taxa"]) == 2


def test_page_in_headless_chromium_shows_what_predict_ranks(served, chromium):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from biovita.predict import Predictor

    url, ckpt, pick, _ = served
    predictor = Predictor(ckpt)
    ARTIFACTS.mkdir(exist_ok=True)
    browser = chromium
    browser.get(url)
    assert "biovita" in browser.title
    for table in ("audio", "image"):
        path = pick[table]
        Select(browser.find_element(By.ID, "rank")).select_by_visible_text("species")
        browser.find_element(By.ID, "file").send_keys(str(path))  # as a user picks a file
        WebDriverWait(browser, 120).until(
            lambda b: b.find_element(By.ID, "status").text in ("done", "failed"))
        assert browser.find_element(By.ID, "status").text == "done", \
            browser.find_element(By.ID, "error").text
        shown = [r.get_attribute("data-name") for r in browser.find_elements(By.CSS_SELECTOR, "#taxa tr.taxon")]
        want = [r["scientific_name"] for r in predictor.predict([str(path)], rank="species", k=5)]
        assert shown == want
        assert browser.find_elements(By.CSS_SELECTOR, "#audio audio")  # playable recordings
        assert browser.find_elements(By.CSS_SELECTOR, "#image img")  # thumbnails
        browser.save_screenshot(str(ARTIFACTS / f"serve_page_{table}.png"))
        browser.get(url)  # a fresh page for the next file
    # a typed name: the nearest photos, whose thumbnails really load from /media
    browser.find_element(By.ID, "text").send_keys("Aves\n")
    WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "status").text == "done")
    deadline = time.time() + 30
    while time.time() < deadline and not browser.execute_script(
            "return Array.from(document.querySelectorAll('#image img')).every(i => i.complete && i.naturalWidth > 0)"):
        time.sleep(0.5)
    assert browser.execute_script(
        "return Array.from(document.querySelectorAll('#image img')).every(i => i.naturalWidth > 0)")
    browser.save_screenshot(str(ARTIFACTS / "serve_page_text.png"))
