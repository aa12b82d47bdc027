"""What a modality is lives in one place: outside the registry (and the schema, the demo-data
generator and its attribute vocabulary), no package module spells a modality name as a string."""
import re
from pathlib import Path

from mmpretrain import modalities

PKG = Path(__file__).resolve().parents[1] / "mmpretrain"
# modalities.py: the registry; config.py: the YAML schema's section names; data/demo.py: the demo
# data generator (it writes images, audio and captions); eval/captioning.py: the demo's attribute words
# export_clip.py: the CLIP format itself has exactly an image tower and a text tower
# cli/make_shards.py, cli/inspect_shards.py: the shard tools' manifest columns and the members they
# write and check (image, audio); they lived outside the package (tools/) until they became commands
ALLOWED = {"modalities.py", "config.py", "data/demo.py", "eval/captioning.py", "export_clip.py",
           "cli/make_shards.py", "cli/inspect_shards.py"}


def test_modality_names_are_spelled_only_in_the_registry():
    names = "|".join(modalities.names())
    literal = re.compile(rf"""["']({names})["']""")
    found = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel in ALLOWED:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if literal.search(line):
                found.append(f"{rel}:{i}: {line.strip()}")
    assert not found, "modality names spelled outside the registry:\n" + "\n".join(found)
