// The CUDA backend of torch.ops.fastdni (schemas: fastdni/ops/schema.py; signatures: common/op_signatures.h).
#pragma once

#include "common/op_signatures.h"

namespace fastdni::cuda {

DniForwardFn dni_forward;
SgPredictFn sg_predict;
DniUpdateFn dni_update_;
SgRegressionFn sg_regression_;

}  // namespace fastdni::cuda
