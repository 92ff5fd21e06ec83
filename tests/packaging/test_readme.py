"""The README's API example runs as written (with a few random batches) and trains."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_api_example_runs():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 784, generator=g)
    y = (x[:, :10].argmax(1))  # a learnable labelling
    printed = []
    namespace = {"batches": [(x, y)] * 80, "print": lambda *args: printed.append(args)}
    exec(compile(code, str(README), "exec"), namespace)
    losses = [float(loss) for loss, _ in printed]
    assert len(losses) == 80 and losses[-1] < 0.5 * losses[0]
    assert all(len(sg) == 2 and all(float(loss) > 0 for loss in sg) for _, sg in printed[1:])
