"""Step metrics (loss, lr, grad norm, tokens/s, TFLOPS, MFU, memory), TensorBoard, the loss plot, alerts."""

from .alerts import AlertLog
from .flops import attention_width, flops_per_token, matmul_params, measure_matmul_tflops, peak_tflops
from .loss_plot import write_loss_svg
from .step_monitor import StepMonitor, peak_memory_mib

__all__ = [
    "AlertLog",
    "StepMonitor",
    "attention_width",
    "flops_per_token",
    "matmul_params",
    "measure_matmul_tflops",
    "peak_memory_mib",
    "peak_tflops",
    "write_loss_svg",
]
