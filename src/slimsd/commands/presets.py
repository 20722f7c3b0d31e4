import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def presets(as_json: bool):
    """List named teachers, students, micro models and recipes."""
    from slimsd.models.presets import PRESETS, RECIPES

    rows = [
        {
            "name": p.name,
            "kind": p.kind,
            "family": p.family,
            "hub_id": p.hub_id,
            "teacher": p.teacher,
            "recipe": p.recipe,
            "published": p.published or None,
            "note": p.note or None,
        }
        for p in PRESETS.values()
    ]
    rows += [
        {
            "name": r,
            "kind": "recipe",
            "family": fam,
            "hub_id": None,
            "teacher": None,
            "recipe": None,
            "published": None,
            "note": None,
        }
        for r, fam in RECIPES.items()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(f"{'name':<18} {'kind':<8} {'family':<6} hub id / note")
    for r in rows:
        click.echo(f"{r['name']:<18} {r['kind']:<8} {r['family']:<6} {r['hub_id'] or r['note'] or ''}")
