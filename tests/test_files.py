"""Files: valid JSON whatever the numbers (``json_safe``)."""

import json
import math

import numpy as np
import torch

from neuralreg.files import json_safe


def test_json_safe_turns_non_finite_numbers_into_null_everywhere():
    value = {
        "nan": math.nan,
        "inf": np.float32("inf"),
        "nested": [1.0, np.array([np.nan, 2.0]), {"t": torch.tensor([3.0, -math.inf])}],
        "tuple": (1, np.int64(2), "text"),
        7: None,
    }
    out = json_safe(value)
    assert out == {
        "nan": None,
        "inf": None,
        "nested": [1.0, [None, 2.0], {"t": [3.0, None]}],
        "tuple": [1, 2, "text"],
        "7": None,
    }
    json.dumps(out, allow_nan=False)  # strict JSON: raises on NaN or Infinity
