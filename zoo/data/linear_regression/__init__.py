"""In-context linear regression as a tfds builder: see ``zoo.data.linear_regression.builder``; the loss
is ``regression_loss``, the closed-form baseline ``bayes_predictions``."""

from zoo.data.linear_regression.baselines import bayes_predictions
from zoo.data.linear_regression.builder import (
    LAYOUTS,
    LinearRegression,
    LinearRegressionConfig,
    make_task,
    regression_example,
    regression_layout,
    regression_points,
)
from zoo.data.linear_regression.losses import (
    make_regression_loss,
    query_index,
    regression_loss,
    regression_metrics,
)

__all__ = ["LAYOUTS", "LinearRegression", "LinearRegressionConfig", "bayes_predictions",
           "make_regression_loss", "make_task", "query_index", "regression_example", "regression_layout",
           "regression_loss", "regression_metrics", "regression_points"]
