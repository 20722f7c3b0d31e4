"""The demo's sheet and page, from a small results.json made here (a model the demo does not have among the rows),
checked independently: the sheet's tiles found by their colours, its text by the drawing calls and the ink they
leave; the page as headless Chromium renders it from the file system."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from slimsd.errors import SlimsdError
from slimsd.toy.report import COLUMNS, draw_sheet, format_table, render_page

from helpers import CHROMIUM, CHROMIUM_FLAGS

CAPTIONS = ["a red circle", "a small blue square on the left", "a green triangle"]
HELD_OUT = [False, False, True]
WHITE = (255, 255, 255)


def fake_results() -> dict:
    """A results.json as the demo writes it, with three rows: one of them a kind the demo does not make."""
    rows = {
        "teacher": ("teacher (toy-sd)", 25, 0.931, 0.792, 0.96, 0.95, 1_234_567, 9.87, 1248.26),
        "kd_student": ("KD student", 25, 0.722, 0.514, 0.88, 0.81, 734_321, 6.54, 901.04),
        "int8_student": ("KD student, int8", 4, 0.701, None, 0.87, 0.8, 734_321, 3.21, 99.45),
    }
    keys = (
        "label",
        "steps",
        "caption_fidelity",
        "caption_fidelity_held_out",
        "colour_accuracy",
        "shape_accuracy",
        "unet_params",
        "step_latency_ms",
        "image_ms",
    )
    return {
        "kind": "slimsd-demo",
        "models": list(rows),
        **{name: dict(zip(keys, values, strict=True)) for name, values in rows.items()},
        "sheet": {"file": "sheet.png", "captions": CAPTIONS, "held_out": HELD_OUT, "first_seed": 1234},
        "page": "index.html",
        "command": "slimsd demo --steps 7 --out 'my demo'",
        "config": {"steps": 7},
        "timings_s": {"total_s": 12.5},
        "threads": 1,
    }


def fake_images(summary: dict) -> tuple[dict, dict]:
    """64 px images, each a colour of its own (row i, column j) with a 3 x 2 block of a second colour of its own
    (a blurring scale would blend the two); and the two colours by (i, j)."""
    images, colours = {}, {}
    for i, name in enumerate(summary["models"]):
        images[name] = []
        for j in range(len(CAPTIONS)):
            base, block = (40 + 60 * i, 30 + 70 * j, 90), (250 - 60 * i, 20, 200 - 70 * j)
            arr = np.empty((64, 64, 3), np.uint8)
            arr[:] = base
            arr[20:22, 30:33] = block
            images[name].append(Image.fromarray(arr))
            colours[i, j] = base, block
    return images, colours


def drawn_text(monkeypatch) -> list:
    """Records each text drawing call as (text, fill, bounding box on the image)."""
    calls = []
    text = ImageDraw.ImageDraw.text

    def record(self, xy, t, fill=None, font=None, *args, **kwargs):
        calls.append((t, fill, self.textbbox(xy, t, font=font)))
        return text(self, xy, t, fill, font, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", record)
    return calls


def test_the_sheet_has_a_row_per_model_and_a_column_per_caption_labelled(monkeypatch):
    summary = fake_results()
    images, colours = fake_images(summary)
    calls = drawn_text(monkeypatch)
    sheet = np.asarray(draw_sheet(summary, images).convert("RGB"))

    # Each image found by its own colour: an upscaled square of the same size everywhere, read back exactly.
    boxes = {}
    for (i, j), (base, block) in colours.items():
        ys, xs = np.nonzero((sheet == base).all(axis=-1))
        top, left, side = ys.min(), xs.min(), xs.max() - xs.min() + 1
        assert ys.max() - top + 1 == side and side % 64 == 0, (i, j)
        scale = side // 64
        tile = sheet[top : top + side, left : left + side]
        # nearest neighbours: every screen pixel is a source pixel, no colour in between
        assert np.array_equal(tile[::scale, ::scale], np.asarray(images[summary["models"][i]][j])), (i, j)
        assert {tuple(c) for c in tile.reshape(-1, 3)} == {base, block}, (i, j)
        boxes[i, j] = (top, left, side)
    sides = {side for _, _, side in boxes.values()}
    assert len(sides) == 1 and sides.pop() >= 128  # readable: at least twice the 64 px
    n_rows, n_cols = len(summary["models"]), len(CAPTIONS)
    tops = [boxes[i, 0][0] for i in range(n_rows)]
    lefts = [boxes[0, j][1] for j in range(n_cols)]
    assert all(boxes[i, j][:2] == (tops[i], lefts[j]) for i in range(n_rows) for j in range(n_cols))
    assert tops == sorted(set(tops)) and lefts == sorted(set(lefts))  # rows in results.json's order
    side = boxes[0, 0][2]

    # Row labels: left of the images, within the row's height; values as results.json holds them.
    for i, name in enumerate(summary["models"]):
        row = summary[name]
        beside = " | ".join(
            t
            for t, _, (x0, y0, x1, y1) in calls
            if x1 <= lefts[0] and tops[i] <= (y0 + y1) / 2 < tops[i] + side
        )
        held = "–" if row["caption_fidelity_held_out"] is None else f"{row['caption_fidelity_held_out']:.3f}"
        for want in (
            row["label"],
            f"{row['steps']} steps",
            f"{round(row['image_ms']):,} ms per image",
            f"fidelity {row['caption_fidelity']:.3f} seen",
            f"{held} held-out",
        ):
            assert want in beside, (want, beside)
    # Captions: above their column, held-out ones (only those) marked.
    for j, caption in enumerate(CAPTIONS):
        above = [
            t
            for t, _, (x0, _y0, x1, y1) in calls
            if lefts[j] <= x0 and x1 <= lefts[j] + side and y1 <= tops[0]
        ]
        assert " ".join(t for t in above if t != "held out") == caption, above
        assert ("held out" in above) == HELD_OUT[j], above

    # The ink: each text left some, and there is none outside the texts and the tiles (with their 1 px frames).
    ink = (sheet != WHITE).any(axis=-1)
    allowed = np.zeros_like(ink)
    for t, _, (x0, y0, x1, y1) in calls:
        assert ink[y0:y1, x0:x1].any(), t
        allowed[y0:y1, x0:x1] = True
    for top, left, side in boxes.values():
        allowed[top - 1 : top + side + 1, left - 1 : left + side + 1] = True
    assert not (ink & ~allowed).any()


def test_the_sheet_needs_an_image_per_caption_for_every_row():
    summary = fake_results()
    images, _ = fake_images(summary)
    images["kd_student"] = images["kd_student"][:2]
    with pytest.raises(SlimsdError, match="'kd_student' has 2 for 3 captions"):
        draw_sheet(summary, images)


def test_the_terminal_table_shows_every_row_of_the_results():
    summary = fake_results()
    lines = format_table(summary).splitlines()
    for name in summary["models"]:
        row = summary[name]
        (line,) = [line for line in lines if line.startswith(row["label"] + " ")]
        cells = line.removeprefix(row["label"]).split()
        held = "–" if row["caption_fidelity_held_out"] is None else f"{row['caption_fidelity_held_out']:.3f}"
        assert cells == [
            str(row["steps"]),
            f"{row['caption_fidelity']:.3f}",
            held,
            f"{row['colour_accuracy']:.3f}",
            f"{row['shape_accuracy']:.3f}",
            f"{row['unet_params']:,}",
            f"{row['step_latency_ms']:.2f}",
            f"{row['image_ms']:.1f}",
        ]


@pytest.mark.browser
def test_the_page_opens_from_the_file_system_and_shows_the_results(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    summary = fake_results()
    out = tmp_path / "demo out"  # a space in the path: the page must still find its sheet
    out.mkdir()
    (out / "results.json").write_text(json.dumps(summary))
    images, _ = fake_images(summary)
    sheet = draw_sheet(summary, images)
    sheet.save(out / "sheet.png")
    (out / "index.html").write_text(render_page(json.loads((out / "results.json").read_text())))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto((out / "index.html").as_uri(), wait_until="load")
            rows = page.locator("#results tbody tr")
            expect(rows).to_have_count(len(summary["models"]))
            shown = [
                {
                    key: text
                    for key, text in zip(
                        r.locator("td").evaluate_all("cells => cells.map(c => c.dataset.metric)"),
                        r.locator("td").all_inner_texts(),
                        strict=True,
                    )
                }
                for r in rows.all()
            ]
            sheet_width = page.locator("img.sheet").evaluate("img => img.complete && img.naturalWidth")
            command = page.locator("#command").inner_text()
            legend = page.locator("#columns dt").all_inner_texts()
        finally:
            browser.close()
    for name, cells in zip(summary["models"], shown, strict=True):
        row = summary[name]
        held = "–" if row["caption_fidelity_held_out"] is None else f"{row['caption_fidelity_held_out']:.3f}"
        assert cells == {
            "label": row["label"],
            "steps": str(row["steps"]),
            "caption_fidelity": f"{row['caption_fidelity']:.3f}",
            "caption_fidelity_held_out": held,
            "colour_accuracy": f"{row['colour_accuracy']:.3f}",
            "shape_accuracy": f"{row['shape_accuracy']:.3f}",
            "unet_params": f"{row['unet_params']:,}",
            "step_latency_ms": f"{row['step_latency_ms']:.2f}",
            "image_ms": f"{row['image_ms']:.1f}",
        }
    assert sheet_width == sheet.width  # the sheet loaded from beside the page, no server
    assert command == summary["command"]
    assert legend == [c.title for c in COLUMNS] and len(legend) == 9  # every column of the table explained


def test_the_tiny_decoder_finding_states_its_ratios():
    from slimsd.toy.report import findings

    lines = findings({"tiny_decoder_vs_lcm": 0.5, "tiny_decoder_image_speedup": 12.04})
    assert lines == [
        "LCM student + tiny decoder: 50% of the LCM student's fidelity with the full VAE, an image 12.0x faster "
        "than the teacher's."
    ]
    assert findings({"tiny_decoder_vs_lcm": None}) == []  # no LCM fidelity to compare with: nothing said
