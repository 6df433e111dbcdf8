"""Lightning with a preconditioner: ``cgfac.integrations.lightning.PreconditionerCallback``.

The LightningModule keeps its own optimizer; the callback calls ``pre.step()`` in
``on_before_optimizer_step``: after the backward of every micro-batch, *before* Lightning's
gradient clipping, so ``gradient_clip_val`` bounds the preconditioned step.
(``cgfac.optim`` optimizers need no callback: Lightning calls ``optimizer.step(closure)``.)

    python examples/lightning_module.py [--tiny]          (pip install "cgfac[lightning]")
"""

import argparse

import torch
from torch import nn

import cgfac
from cgfac.integrations.lightning import PreconditionerCallback

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--tiny", action="store_true", help="a small model for one epoch")
args = parser.parse_args()


class Classifier(pl.LightningModule):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, width), nn.ReLU(), nn.Linear(width, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


torch.manual_seed(0)
width, epochs = (32, 1) if args.tiny else (256, 10)
x = torch.randn(2048, 20)
y = (x @ torch.randn(20, 5)).argmax(1)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=128, shuffle=True)

module = Classifier(width)
pre = cgfac.CGFAC(module.net, damping=1e-3)
trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, gradient_clip_val=1.0, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[PreconditionerCallback(pre)])
with torch.no_grad():  # the preconditioner records rows in training forwards with grad only
    before = nn.functional.cross_entropy(module(x), y).item()
trainer.fit(module, loader)
print(f"preconditioner steps {pre.steps}, layer 0: {pre.layer_stats()['0']['method']}")
with torch.no_grad():
    print(f"loss {before:.4f} -> {nn.functional.cross_entropy(module(x), y).item():.4f}")
