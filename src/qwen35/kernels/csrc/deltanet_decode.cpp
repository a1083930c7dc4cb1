// (placeholder: filled in by the deltanet_decode work)
#include <torch/library.h>
