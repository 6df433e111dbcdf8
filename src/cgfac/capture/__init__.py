"""What the preconditioner captures of the model.

* :mod:`cgfac.capture.registration`: which modules are covered (a layer helper each), the
  registration report and the reasons a module is not covered.
* :mod:`cgfac.capture.capture`: the :class:`~cgfac.capture.capture.Recorder` the helpers' hooks
  report to (inputs and output gradients per step, the true Fisher's sampled backward), and the
  per-rank seeds of the sampling.

The rows a layer's curvature is built from are :class:`cgfac.rows.Rows`, beside this package: the
layers and the curvature read them too, and the layers must not import this package (it imports
the layers).
"""
