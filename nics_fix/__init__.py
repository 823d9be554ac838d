"""nics_fix: fixed-point training simulation on TensorFlow 2 / Keras 3.

Four quantities can be quantized: weights, weight gradients, activations and
activation gradients. See the README for the config format and a tour.

>>> import nics_fix as nf
>>> float(nf.fixed_point_quantize([0.3], bit_width=4, scale=0)[0])
0.25
"""

from nics_fix.config import (
    ConfigError,
    DataConfig,
    FixedConfig,
    GradientConfig,
    LayerFixedConfig,
    PointConfig,
    StorageConfig,
    parse_cfg_from_file,
    parse_cfg_from_str,
)
from nics_fix.introspect import fixed_points, layer_fixed_configs, unmatched_by_name
from nics_fix.layers import (
    Activation,
    Add,
    AveragePooling2D,
    AvgPool2D,
    BatchNormalization,
    Concatenate,
    Conv2D,
    DepthwiseConv2D,
    Dense,
    Dropout,
    Flatten,
    GlobalAveragePooling2D,
    MaxPool2D,
    MaxPooling2D,
    Quantize,
    ReLU,
    Reshape,
)
from nics_fix.log import logger
from nics_fix.manual import quantitize, quantize, wrap
from nics_fix.quant import (
    MAX_SCALE,
    MIN_SCALE,
    auto_scale,
    fixed_point_quantize,
    quantization_step,
    quantize_ste,
)
from nics_fix.saving import FixedModelError, fixed_model_saver, restore_fixed_model
from nics_fix.scope import fixed_scope, kwargs_scope, kwargs_scope_by_type
from nics_fix.strategy import (
    NoiseStrategy,
    PointInfo,
    Strategy,
    StrategyConfig,
    parse_strategy_cfg_from_file,
    parse_strategy_cfg_from_str,
    registered_strategies,
)

__version__ = "0.1.0"

# THDH: weights stored in fixed point, the update path, gradient buffer, counters.
from nics_fix.optimizers import (  # noqa: E402
    FixedStorageOptimizer,
    PowerOfTwoSchedule,
    fixed_storage_optimizer,
    floor_power_of_two,
    lr_shift,
)
from nics_fix.thdh import (  # noqa: E402
    GradientBufferStrategy,
    UpdateCountersCallback,
    buffer_scale,
    buffer_strategy_config,
)

# Bring your own Keras 3 model: convert it to fixed point; the layers it needs.
from nics_fix.layers import (  # noqa: E402
    Conv1D,
    Conv2DTranspose,
    EinsumDense,
    Embedding,
    LayerNormalization,
    MultiHeadAttention,
    SeparableConv2D,
)
from nics_fix.convert import ConversionError, fixed_model, unsupported_layers  # noqa: E402

# Integer deployment: exact sums and accumulator width, integer export, the integer engine.
from nics_fix.accumulator import (  # noqa: E402
    accumulator_counters,
    reset_accumulator_counters,
    sum_exactness,
)
from nics_fix.config import AccumulatorConfig  # noqa: E402
from nics_fix.export import ExportError, export_integer_model  # noqa: E402
from nics_fix.integer_engine import IntegerModel, IntegerModelError, IntegerOutput  # noqa: E402
