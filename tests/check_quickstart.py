"""Check the figures of a quick-start run (ctest quickstart_metrics): python check_quickstart.py
RUN_DIR. The thresholds sit a little below the README's figures, so a regression fails."""

import json
import sys
from pathlib import Path

MINIMUM = {"chosen": 0.97, "cnn_dnn": 0.97, "average_log_probabilities": 0.97,
           "average_probabilities": 0.96,
           "majority_vote": 0.95}


def main(run_dir):
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    combiners = metrics["combiners"]
    problems = [f"{name}: test accuracy {combiners[name]['accuracy']:.4f} < {low}"
                for name, low in MINIMUM.items() if combiners[name]["accuracy"] < low]
    if sum(sum(row) for row in combiners["chosen"]["confusion_matrix"]) != 359:
        problems.append("the test split does not have the 359 digits of the packaged split")
    if len(metrics["extra"]["local"]) != 4:
        problems.append(f"{len(metrics['extra']['local'])} local CNNs, expected 4 (2x2 grid)")
    for name, m in combiners.items():
        print(f"{name:24s} {100 * m['accuracy']:6.2f} %")
    if problems:
        sys.exit("quick start figures off: " + "; ".join(problems))


if __name__ == "__main__":
    main(sys.argv[1])
