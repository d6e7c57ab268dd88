"""SST-2 dev accuracy through the HTTP API: the shipped `sst2` prompt module vs zero-shot.

Zero-shot is a `template` module with the same template and verbalizers and no learned weights.
Starts its own server (embedded backbone, a temporary store with the example tasks).

    .venv/bin/python bench/sst2_http.py [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import machine  # bench/common.py (the script's folder is on sys.path)

from clients import Client
from modules.core.backbone import Backbone
from modules.registry import kind_class

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/server.py starts the server, as the tests do
from tests.server import running_server  # noqa: E402

DEV = ROOT.parent / "shared" / "data" / "sst2" / "stsa.binary.dev"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=0, help="first N dev rows only (0 = all 872)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sst2_http.json"))
    args = ap.parse_args()

    rows = [line.split(" ", 1) for line in DEV.read_text().splitlines()]
    rows = [(x, "positive" if y == "1" else "negative") for y, x in rows][: args.limit or None]
    with tempfile.TemporaryDirectory() as store, running_server({"FROZENLM_STORE_DIR": store}) as url:
        with Client(url, timeout=600) as c:
            manifest = c.get_task("sst2").raw["manifest"]
            zero = kind_class("template").new(Backbone.load(), template=manifest["template"],
                                             labels=manifest["labels"])
            c.upload("sst2-zero-shot", zero.to_artifact())
            results = {}
            for task in ("sst2-zero-shot", "sst2"):
                start, preds = time.monotonic(), []
                for i in range(0, len(rows), 64):
                    preds += [o.label for o in c.infer(task, [x for x, _ in rows[i:i + 64]]).outputs]
                acc = sum(p == y for p, (_, y) in zip(preds, rows)) / len(rows)
                results[task] = {"accuracy": round(acc, 4), "rows": len(rows),
                                 "seconds": round(time.monotonic() - start, 1)}
    out = {"machine": machine(),
           "template": manifest["template"], "labels": manifest["labels"], "results": results}
    print(f"SST-2 dev ({len(rows)} rows) through POST /tasks/<name>/infer")
    print(f"{'task':16} {'accuracy':>9} {'seconds':>8}")
    for task, r in results.items():
        print(f"{task:16} {r['accuracy']:9.4f} {r['seconds']:8.1f}")
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
