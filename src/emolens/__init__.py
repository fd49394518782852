"""emolens: find, read and steer the emotion representations inside language models.

    lm = emolens.load_model()                       # embedded SmolLM2-135M-Instruct, offline
    bank = emolens.build(lm)                        # 171 emotion vectors, cached
    readout = emolens.read(lm, bank, messages)      # tokens x emotions
    with bank.steering({"calm": 0.05}).apply(lm):   # or: with emolens.steer(lm, bank, {...}):
        for token in emolens.generate(lm, bank, "How was your day?"):
            print(token.text, end="")

`emolens.read`, `emolens.build`, `emolens.steer` and `emolens.generate` are functions; the
modules are `emolens.readout`, `emolens.build`, `emolens.steer` and `emolens.generation`.
"""

__version__ = "0.2.0"

from emolens.bank import EmotionBank  # noqa: E402
from emolens.build import Recipe, build  # noqa: E402
from emolens.errors import EmolensError  # noqa: E402
from emolens.generation import Sampling  # noqa: E402
from emolens.models import LoadedModel, load_model, wrap_model  # noqa: E402
from emolens.readout import Readout, generate, read, read_many  # noqa: E402
from emolens.steer import SteeringVector, steer  # noqa: E402

__all__ = [
    "EmolensError",
    "EmotionBank",
    "LoadedModel",
    "Readout",
    "Recipe",
    "Sampling",
    "SteeringVector",
    "build",
    "generate",
    "load_model",
    "read",
    "read_many",
    "steer",
    "wrap_model",
]
