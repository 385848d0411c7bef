import sys
from pathlib import Path

# the analyses' small chain (tests/neurochains/_analyses_chain.py): a random DigitsNet chain built
# in about a second, with a removed block and partly pruned layers
_NEURO = Path(__file__).resolve().parent.parent / "neurochains"
if str(_NEURO) not in sys.path:
    sys.path.insert(0, str(_NEURO))
