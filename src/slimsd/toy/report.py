"""The demo's result for people: the terminal table, the sample sheet (``sheet.png``) and the page
(``index.html``), all made from the demo's ``results.json`` (the sheet also from its images).

Rows come from ``results.json``'s ``models`` list (each model's entry there holds its ``label``), so a model the
demo adds to its results is a new row of the table, the sheet and the page without code here. The page is one
of slimsd's reports (slimsd.measure.report: the same columns give the terminal and the HTML table) and names
the sheet relatively, so it opens from the file system with no server.
"""

from __future__ import annotations

import html
import textwrap
from collections.abc import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from slimsd.errors import SlimsdError
from slimsd.measure.report import Column, key_values, legend, page, table, text_table

SHEET_FILE = "sheet.png"
PAGE_FILE = "index.html"

COLUMNS = (
    Column(
        "label", "model", numeric=False, about="The model: the toy teacher and the students made from it."
    ),
    Column(
        "steps",
        "steps",
        about="Sampling steps of each model: the teacher and the KD / task-only students at the teacher's 25 "
        "PNDM steps, the step-distilled (LCM) student at its own 4.",
    ),
    Column(
        "caption_fidelity",
        "fidelity seen",
        "{:.3f}",
        about="Caption fidelity on fresh captions of colour x shape combinations seen in training: the share of "
        "samples whose colour and shape, read back from the pixels, are the caption's (mean over seeds).",
    ),
    Column(
        "caption_fidelity_held_out",
        "held-out",
        "{:.3f}",
        about="Caption fidelity on the held-out combinations, which no training data contains (red square, "
        "green triangle, blue cross, yellow circle): composing words learned apart.",
    ),
    Column(
        "colour_accuracy", "colour", "{:.3f}", about="Share of seen-combination samples of the right colour."
    ),
    Column(
        "shape_accuracy", "shape", "{:.3f}", about="Share of seen-combination samples of the right shape."
    ),
    Column(
        "unet_params", "U-Net params", "{:,}", about="Parameters of the U-Net (the part distillation slims)."
    ),
    Column(
        "step_latency_ms",
        "step ms",
        "{:.2f}",
        about="Median milliseconds of one U-Net evaluation at batch 2 (one classifier-free guidance step).",
    ),
    Column(
        "image_ms",
        "image ms",
        "{:.1f}",
        about="Median milliseconds of one whole 64 px image end to end at the model's own steps and guidance: "
        "text encoding, every U-Net evaluation, VAE decode.",
    ),
)


def rows(summary: Mapping) -> list[dict]:
    """The rows of the results, in the order of ``summary['models']``."""
    return [{"label": name, **summary[name]} for name in summary["models"]]


def findings(summary: Mapping) -> list[str]:
    """What the numbers say, in sentences (those whose numbers the results hold)."""
    lines = []
    if summary.get("kd_vs_teacher") is not None:
        lines.append(
            f"KD student keeps {summary['kd_vs_teacher']:.0%} of the teacher's caption fidelity (seen "
            f"combinations); the task-only student {summary['task_only_vs_teacher']:.0%}. colour, shape: accuracy "
            "on seen combinations."
        )
    if summary.get("lcm_vs_teacher") is not None:
        lines.append(
            f"LCM student: {summary['lcm_vs_teacher']:.0%} of the teacher's fidelity in "
            f"{summary['lcm_student']['steps']} steps, an image {summary['lcm_image_speedup']:.1f}x faster "
            "(image ms: end to end, each model at its own steps and guidance)."
        )
    if summary.get("tiny_decoder_vs_lcm") is not None:
        lines.append(
            f"LCM student + tiny decoder: {summary['tiny_decoder_vs_lcm']:.0%} of the LCM student's fidelity with "
            f"the full VAE, an image {summary['tiny_decoder_image_speedup']:.1f}x faster than the teacher's."
        )
    if summary.get("int8_vs_lcm") is not None:
        lines.append(
            f"int8 LCM student (OpenVINO, slimsd quantize): {summary['int8_vs_lcm']:.0%} of the fp32 LCM student's "
            f"fidelity, an image {summary['int8_image_speedup']:.2f}x as fast at the same steps."
        )
    return lines


def format_table(summary: Mapping) -> str:
    """The terminal table: a row per model, then the findings."""
    return "\n".join([*text_table(COLUMNS, rows(summary)), *findings(summary)])


# ---------------------------------------------------------------------------------------------------------------
# The sheet: a row per model, a column per caption, each 64 px sample scaled up without blurring.

SCALE = 2  # 64 px samples drawn at 128 px: shapes and colours readable at a glance
FONT_SIZE = 15
MARGIN, GAP = 16, 12  # around the sheet; between tiles
INK, FAINT, MARK = (20, 20, 20), (110, 110, 110), (200, 70, 0)  # text; secondary text; the held-out mark
FRAME = (210, 210, 210)
HELD_OUT_MARK = "held out"


def _font() -> ImageFont.ImageFont:
    # Pillow's own font (FreeType when Pillow has it, else its bitmap font): nothing to download.
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, ImportError):  # Pillow < 10.1 or without FreeType: the fixed-size bitmap font
        return ImageFont.load_default()


def _number(fmt: str, value) -> str:
    return "–" if value is None else fmt.format(value)


def _wrap(text: str, width: int, font, measure: ImageDraw.ImageDraw) -> list[str]:
    """``text`` in as few lines as fit ``width`` pixels (a word longer than that is broken)."""
    for chars in range(max(1, len(text)), 0, -1):
        lines = textwrap.wrap(text, chars) or [""]
        if max(measure.textlength(line, font=font) for line in lines) <= width:
            break
    return lines


def row_label(row: Mapping) -> list[tuple[str, tuple[int, int, int]]]:
    """A model's lines beside its row: name, steps and time per image, caption fidelity seen and held out."""
    return [
        (str(row["label"]), INK),
        (f"{row['steps']} steps, {_number('{:,.0f}', row.get('image_ms'))} ms per image", FAINT),
        (f"fidelity {_number('{:.3f}', row.get('caption_fidelity'))} seen", FAINT),
        (f"{_number('{:.3f}', row.get('caption_fidelity_held_out'))} held-out", FAINT),
    ]


def draw_sheet(
    summary: Mapping, images: Mapping[str, Sequence[Image.Image]], scale: int = SCALE
) -> Image.Image:
    """The sheet of ``summary``'s models (rows, in its order) by its sheet captions (columns): ``images[model][i]``
    is the model's sample for caption i. Captions are written above their column, held-out ones marked; each
    row's label, steps, fidelity and ms per image beside it. Samples are scaled by ``scale`` with nearest
    neighbours, so every pixel stays a sharp square."""
    sheet = summary["sheet"]
    captions, held_out = sheet["captions"], sheet["held_out"]
    names = list(summary["models"])
    for name in names:
        if len(images.get(name, ())) != len(captions):
            raise SlimsdError(
                f"the sheet needs one image per caption for each model: {name!r} has "
                f"{len(images.get(name, ()))} for {len(captions)} captions"
            )
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = round(FONT_SIZE * 1.4)
    size = images[names[0]][0].size
    tile_w, tile_h = size[0] * scale, size[1] * scale
    labels = [row_label(row) for row in rows(summary)]
    label_w = max(measure.textlength(text, font=font) for lines in labels for text, _ in lines)
    left = MARGIN + int(label_w) + GAP
    heads = [
        [(text, INK) for text in _wrap(caption, tile_w, font, measure)]
        + ([(HELD_OUT_MARK, MARK)] if held else [])
        for caption, held in zip(captions, held_out, strict=True)
    ]
    title = f"same caption and seed in each column (caption i: seed {sheet['first_seed']} + i)"
    top = MARGIN + line + GAP  # below the title
    head_h = max(len(h) for h in heads) * line
    first_row = top + head_h + GAP // 2
    width = left + len(captions) * (tile_w + GAP) - GAP + MARGIN
    height = first_row + len(names) * (tile_h + GAP) - GAP + MARGIN
    width = max(width, MARGIN * 2 + int(measure.textlength(title, font=font)))

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN), title, fill=FAINT, font=font)
    for j, head in enumerate(heads):
        x = left + j * (tile_w + GAP)
        y = first_row - GAP // 2 - len(head) * line  # the caption sits on its column
        for k, (text, colour) in enumerate(head):
            draw.text((x, y + k * line), text, fill=colour, font=font)
    for i, (name, label) in enumerate(zip(names, labels, strict=True)):
        y = first_row + i * (tile_h + GAP)
        for k, (text, colour) in enumerate(label):
            draw.text((MARGIN, y + k * line), text, fill=colour, font=font)
        for j, sample in enumerate(images[name]):
            tile = sample.convert("RGB").resize((tile_w, tile_h), Image.Resampling.NEAREST)
            x = left + j * (tile_w + GAP)
            image.paste(tile, (x, y))
            # a hairline frame: a toy sample's white background would otherwise melt into the sheet's
            draw.rectangle((x - 1, y - 1, x + tile_w, y + tile_h), outline=FRAME)
    return image


# ---------------------------------------------------------------------------------------------------------------
# The page.


def render_page(summary: Mapping) -> str:
    """index.html: what ran, the table (as in the terminal), the sheet, what each column means, the settings."""
    e = html.escape
    sheet = summary["sheet"]
    marked = [c for c, held in zip(sheet["captions"], sheet["held_out"], strict=True) if held]
    body = [
        "<p>The toy teacher (toy-sd) compressed with BK-SDM's bk-small recipe; one student distilled with "
        "task + output-KD + feature-KD, a twin trained with the task loss alone (same data, init and seed), "
        "and the KD student step-distilled with LCM to sample in a few steps.</p>",
        f"<p>Made by:</p><pre id='command'>{e(summary.get('command') or 'slimsd demo')}</pre>",
        table("results", COLUMNS, rows(summary), "Results (the terminal's table)"),
        *(f"<p class='finding'>{e(text)}</p>" for text in findings(summary)),
        "<h2>Samples</h2>",
        f"<p>One row per model, one column per caption; column i is sampled with seed {sheet['first_seed']} + i "
        "in every row, so a column compares the models on one caption and one noise. Captions marked "
        f"<em>{HELD_OUT_MARK}</em> ({e(', '.join(marked)) or 'none here'}) name colour x shape combinations "
        "that no training data contains.</p>",
        f"<img class='sheet' src='{e(sheet['file'])}' alt='samples: a row per model, a column per caption'>",
        "<h2>What each column means</h2>",
        legend(COLUMNS),
        key_values(
            "settings", "Settings", {**summary.get("config", {}), "torch threads": summary.get("threads")}
        ),
        key_values("timings", "Timings (s)", summary.get("timings_s", {})),
    ]
    return page("slimsd demo", body)
