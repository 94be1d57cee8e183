"""CI: neuralreg installed from its wheel, outside the checkout, builds and uses its native kernels."""

import sys
import warnings
from pathlib import Path

import neuralreg
from neuralreg import RegistrationConfig, register_pair
from neuralreg.phantoms import knee_phantom_pair

checkout = Path(sys.argv[1]).resolve()
where = Path(neuralreg.__file__).resolve()
assert checkout not in where.parents, f"imported from the checkout: {where}"
status = neuralreg.backends()
assert status["native"].startswith("available (CPU"), status
pair = knee_phantom_pair(0, shape=(24, 32, 32))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    config = RegistrationConfig(steps=20, affine_steps=20)
    reg = register_pair(pair["moving"], pair["fixed"], config, run={"progress": False})
assert reg.info["backend"] == "native", reg.info["backend"]
print(f"wheel check: neuralreg from {where.parent}, native backend {status['native']}, a registration used it")
