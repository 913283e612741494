"""Dynamic loss scaling for fp16 training, with InternLM's grad_scaler semantics (hysteresis included)."""


class DynamicGradScaler:
    def __init__(
        self,
        initial_scale=2**16,
        min_scale=1,
        growth_factor=2,
        backoff_factor=0.5,
        growth_interval=1000,
        hysteresis=2,
        max_scale=2**24,
    ):
        self.scale = float(initial_scale)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval, self.hysteresis = growth_interval, hysteresis
        self._clean_steps = 0
        self._hysteresis_left = hysteresis

    def update(self, overflow: bool) -> None:
        """Backs off after `hysteresis` overflows; grows after growth_interval clean steps in a row."""
        if overflow:
            self._clean_steps = 0
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self._clean_steps += 1
            if self._clean_steps == self.growth_interval:
                self._clean_steps = 0
                self._hysteresis_left = self.hysteresis
                self.scale = min(self.scale * self.growth_factor, self.max_scale)

    def state_dict(self) -> dict:
        """Where the dynamic scale stands (the settings come from the config)."""
        return {"scale": self.scale, "clean_steps": self._clean_steps, "hysteresis_left": self._hysteresis_left}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self._clean_steps = int(state["clean_steps"])
        self._hysteresis_left = int(state["hysteresis_left"])
