"""metanas-ray: MetaNAS (Elsken et al., CVPR 2020) meta-learning of neural architectures, scaled out with Ray.

    import metanas_ray as mr
    run = mr.train(mr.load_config("tune_configs/quick.yaml"), "runs/quick")
    predictor = mr.predict(run, support="my_support/")

The functions are those of :mod:`metanas_ray.api`. ``mr.predict`` and ``mr.tune`` stay these functions after the
command-line modules of the same names (``python -m metanas_ray.predict`` / ``.tune``) are imported: reach those
modules with ``importlib.import_module("metanas_ray.tune")`` or ``from metanas_ray.tune import ...``.
"""
import sys
import types

from .api import Predictor, Run, load_config, load_run, predict, train, tune

__all__ = ["load_config", "train", "load_run", "predict", "tune", "Run", "Predictor"]


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if name in ("predict", "tune") and isinstance(value, types.ModuleType):
            return  # importing the submodule binds it here: keep the API function (the module is in sys.modules)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
