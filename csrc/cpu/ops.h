// The CPU backend of torch.ops.fastdni (schemas: fastdni/ops/schema.py; signatures: common/op_signatures.h).
#pragma once

#include "common/op_signatures.h"

namespace fastdni::cpu {

DniForwardFn dni_forward;
SgPredictFn sg_predict;
DniUpdateFn dni_update_;
SgRegressionFn sg_regression_;
BatchNormActFn batch_norm_act;
BatchNormActUpdateFn batch_norm_act_update_;

}  // namespace fastdni::cpu
