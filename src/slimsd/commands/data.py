import json

import click

from slimsd.commands.options import filter_option


def _num(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _spread(label: str, s: dict | None) -> str:
    if s is None:
        return f"{label}: none"
    keys = ("min", "p5", "median", "p95", "max")
    return f"{label}: " + "  ".join(f"{k} {_num(s[k])}" for k in keys) + f"  mean {s['mean']:.1f}"


def filter_lines(counts: dict) -> list[str]:
    """One line per data_filter rule: what it removed (and how many of those had no value), what is left."""
    lines = []
    for f in counts["filter"]:
        no_value = f" ({f['no_value']} without a value)" if f.get("no_value") else ""
        left = f", {f['left']} left" if "left" in f else ""
        lines.append(f"filter {f['rule']!r}: removed {f['removed']}{no_value}{left}")
    return lines


def dry_run_rows(cfg, num_processes: int = 1) -> tuple[list[str], dict]:
    """The rows a run of ``cfg`` would use (data indexed and filtered, no image read, no model loaded), as
    `#` lines and a dict. Data that cannot be opened here is `not available` (a dry run may plan for another
    machine); a filter rule that cannot apply to the data is an error (exit 2)."""
    from slimsd.errors import SlimsdError
    from slimsd.train.filters import FilterError
    from slimsd.train.sources import describe_skipped, open_source, row_counts

    try:
        counts = row_counts(open_source(cfg.data, cfg.seed, cfg.data_filter))
    except FilterError:
        raise
    except SlimsdError as e:
        return [f"# data: not available ({e})"], {"error": str(e)}
    lines = [
        f"# data {cfg.data!r} ({counts['kind']}): dropped at indexing: {describe_skipped(counts['dropped'])}",
        *(f"# {line}" for line in filter_lines(counts)),
        f"# data: a run uses {counts['rows']} rows",
    ]
    global_batch = cfg.batch_size * num_processes
    if counts["rows"] < global_batch:
        lines[-1] += f", fewer than one global batch ({global_batch}): it would stop before any model loads"
    return lines, counts


def describe(s: dict) -> list[str]:
    """`slimsd data`'s lines."""
    from slimsd.train.sources import describe_skipped

    lines = [
        f"data {s['data']!r} ({s['kind']}): {s['found']} rows found",
        f"dropped at indexing: {describe_skipped(s['dropped'])}",
        *filter_lines(s),
        f"kept: {s['rows']} rows",
    ]
    r = s["read"]
    if r is None:
        return [*lines, "a latent cache: its rows are latents and embeddings, no images or captions to show"]
    what = f"all {r['rows']} kept rows" if r["mode"] == "full" else f"a sample of {r['rows']} kept rows"
    bad = sum(r["unreadable"].values())
    lines.append(
        f"read {what}: {r['readable']} readable, {bad} unreadable"
        + (f" ({describe_skipped(r['unreadable'])})" if bad else "")
    )
    lines += [
        _spread("caption characters", s["captions"]["characters"]),
        _spread("caption words", s["captions"]["words"]),
        _spread("image width", s["image_sizes"]["width"]),
        _spread("image height", s["image_sizes"]["height"]),
        _spread("image short side", s["image_sizes"]["short_side"]),
    ]
    for name, c in s["columns"].items():
        head = f"column {name}: {c['kind']}, {c['values']} values" + (
            f" ({c['missing']} missing)" if c["missing"] else ""
        )
        if c["kind"] == "number":
            head += f": {_num(c['min'])} to {_num(c['max'])}, median {_num(c['median'])}"
        elif c["kind"] == "bool":
            head += f": true {c['true']}, false {c['false']}"
        elif c["kind"] == "text":
            head += f": {c['distinct']} distinct; " + ", ".join(f"{v!r} {n}" for v, n in c["top"])
        lines.append(head)
    if s["grid"]:
        lines.append(f"grid: wrote {s['grid']['path']} ({s['grid']['images']} images)")
    return lines


@click.command()
@click.argument("data_spec", metavar="DATA", required=False)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="A distill / finetune config: its data and data_filter (DATA and --filter add to them).",
)
@filter_option("Keep rows by metadata, e.g. 'aesthetic >= 7.5', 'min(width, height) >= 512' (repeatable).")
@click.option("--sample", type=click.IntRange(1), default=64, show_default=True, help="Kept rows to read.")
@click.option("--full", is_flag=True, help="Read every kept row (unreadable counts for the whole data).")
@click.option(
    "--grid", type=click.Path(dir_okay=False), default=None, help="Write kept images + captions (PNG)."
)
@click.option("--grid-images", type=click.IntRange(1, 64), default=16, show_default=True)
@click.option(
    "--seed", type=click.IntRange(0), default=0, show_default=True, help="Which rows the sample reads."
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def data(data_spec, config_file, rules, sample, full, grid, grid_images, seed, as_json):
    """See the data before a run: rows found, rows each --filter rule removes, unreadable rows, caption lengths,
    image sizes, metadata columns with their ranges, and a grid of kept images with their captions.

    DATA: an image folder (metadata.jsonl or .txt sidecars), webdataset .tar shard(s), parquet, shapes:N or a
    `slimsd cache` folder.
    """
    from slimsd.errors import SlimsdError
    from slimsd.train.filters import add_rules
    from slimsd.train.survey import survey

    values = {}
    if config_file:  # the config module imports torch (devices): only when a config is read
        from slimsd.train.config import read_values

        values = read_values(config_file)
    values = add_rules(values, rules)
    spec = data_spec or values.get("data")
    if spec is None:
        raise SlimsdError(
            "no data: give DATA (a folder, .tar shards, parquet, shapes:N) or a --config with data"
        )
    s = survey(
        str(spec),
        values.get("data_filter"),
        sample=sample,
        full=full,
        seed=seed,
        grid=grid,
        grid_images=grid_images,
    )
    click.echo(json.dumps(s, indent=1) if as_json else "\n".join(describe(s)))
