"""Convert SST-2 (`<0/1> <sentence>` lines, ../shared/data/sst2) into frozenlm JSONL rows.

    python examples/sst2_data.py ../shared/data/sst2/stsa.binary.train > sst2.train.jsonl
"""

import json
import sys

LABELS = ["negative", "positive"]

for line in open(sys.argv[1], encoding="utf-8"):
    label, text = line.rstrip("\n").split(" ", 1)
    print(json.dumps({"input": text, "label": LABELS[int(label)]}))
