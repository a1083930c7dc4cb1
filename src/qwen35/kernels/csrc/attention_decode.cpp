// (placeholder: filled in by the attention_decode work)
#include <torch/library.h>
