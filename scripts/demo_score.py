"""Score a `plsc demo recognize` JSON against the expected names of the image's cells.

The expected file (as ../shared/data/demo/query/expected.json) maps an image path to its cells, each a box and
the name of the one person in it (or "unknown"). A detected face belongs to the cell holding its box centre.

    python scripts/demo_score.py --result output/demo/result/group1.json --expected EXPECTED.json [--json OUT]

With ``--json OUT`` the score is also written as ``{"right": n, "faces": cells, "threshold": t}``.
"""

import argparse
import json
import sys
from pathlib import Path


def cells_for(expected: dict, image: str) -> list[dict]:
    """The entry whose key is the image's path, or ends with its file name."""
    for key, cells in expected.items():
        if Path(image).name == Path(key).name:
            return cells
    sys.exit(f"demo_score: {image} is not in the expected file (keys: {', '.join(expected)})")


def cell_index(box: list[int], cells: list[dict]) -> int | None:
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    for number, cell in enumerate(cells):
        x1, y1, x2, y2 = cell["cell"]
        if x1 <= x < x2 and y1 <= y < y2:
            return number
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--result", required=True, help="the .json written by plsc demo recognize")
    parser.add_argument("--expected", required=True, help="expected cells and names")
    parser.add_argument("--json", help="also write the score to this file")
    args = parser.parse_args()
    result = json.loads(Path(args.result).read_text())
    cells = cells_for(json.loads(Path(args.expected).read_text()), result["input"])
    answers: dict[int, list[dict]] = {}
    for face in result["faces"]:
        answers.setdefault(cell_index(face["box"], cells), []).append(face)
    right = 0
    for number, cell in enumerate(cells):
        found = answers.get(number, [])
        got = ", ".join(f"{face['name']} ({face['score']:.3f})" for face in found) or "no face"
        ok = len(found) == 1 and found[0]["name"] == cell["name"]
        right += ok
        mark = "" if ok else "  <-- wrong"
        print(f"cell {number} {cell['cell']}: expected {cell['name']}, got {got}{mark}")
    stray = len(answers.get(None, []))
    print(f"{right} of {len(cells)} faces as expected (threshold {result['threshold']:.3f}"
          f"{f', {stray} faces outside every cell' if stray else ''})")
    if args.json:
        score = {"right": right, "faces": len(cells), "threshold": result["threshold"]}
        Path(args.json).write_text(json.dumps(score) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
