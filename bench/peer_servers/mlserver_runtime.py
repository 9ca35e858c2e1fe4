"""MLServer custom runtime (run by MLServer in its own virtualenv): a TorchScript model, loaded
from `parameters.uri`, run under `torch.inference_mode` on the batch MLServer's adaptive batching
hands it."""

import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class TorchScriptRuntime(MLModel):
    async def load(self) -> bool:
        self._module = torch.jit.load(self.settings.parameters.uri).eval()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        with torch.inference_mode():
            y = self._module(torch.from_numpy(x)).numpy()
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(self.settings.parameters.extra["output"], y)],
        )
