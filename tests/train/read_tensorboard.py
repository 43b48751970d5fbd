"""Reads a run's TensorBoard event files with the `tensorboard` package (an independent reader of the
format) and prints {tag: [[step, value], ...]} as JSON. Used by tests/train/test_tensorboard.cpp.

  read_tensorboard.py DIR
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator


def main():
    accumulator = EventAccumulator(sys.argv[1], size_guidance={SCALARS: 0})
    accumulator.Reload()
    out = {tag: [[e.step, e.value] for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()[SCALARS]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
