"""Table of convolution cases shared by the conv op tests.

Each `ConvCase` fixes one convolution geometry: the NHWC input shape, the
filter's spatial size and output channels, strides, padding and dilations.
tests/test_conv_case_table.py runs every case through the forward,
backprop-input and backprop-filter ops on every kernel path and compares the
float32 bits with keras_dfp.reference.

The table has 48 cases: 42 with a non-empty result and 6 zero-size cases
(batch 0, height 0, height and width 0, width 0, 0 input channels and
0 filters). VALID cases with an input smaller than the dilated kernel are
left out because the op and the reference disagree there; see
tests/test_op_errors.py. Together they cover

- input sizes 1, odd, even and smaller than the (dilated) kernel;
- kernels 1 to 7, even and non-square ones included;
- strides 1 to 3 per axis, also strides larger than the kernel;
- SAME and VALID padding, where SAME pads the extra row or column at the
  bottom or right as tf.nn.conv2d does (even kernels, stride 2 with odd sizes);
- dilations 1 to 3 per axis, also with strides above 1;
- batch 1 to 3;
- input and output channel counts from 0 to 129, mostly not multiples of the
  8, 16 or 32 lanes of an int16 vector register (1, 3, 5, 17, 33, 65, 127,
  129), with 16 and 32 as aligned cases.

Sizes are small so that the table runs in seconds on every kernel path.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class ConvCase:
    """One convolution geometry.

    input_shape: NHWC shape of the forward input.
    kernel: (filter height, filter width, output channels). The filter's
        input channels equal input_shape[3].
    strides, dilations: an int or an (h, w) pair, as keras_dfp.ops accepts.
    """

    id: str
    input_shape: tuple
    kernel: tuple
    strides: object = 1
    padding: str = "VALID"
    dilations: object = 1

    @property
    def filter_shape(self):
        """HWIO shape of the filter."""
        kernel_h, kernel_w, out_c = self.kernel
        return (kernel_h, kernel_w, self.input_shape[3], out_c)

    @property
    def attrs(self):
        """Keyword arguments of the keras_dfp.ops and reference conv functions."""
        return {
            "strides": self.strides,
            "padding": self.padding,
            "dilations": self.dilations,
        }

    @property
    def is_zero_size(self):
        """True when the input or the filter has a zero-size dimension."""
        return 0 in self.input_shape or 0 in self.kernel


CONV_CASES = [
    # Input sizes 1 and smaller than the kernel.
    ConvCase("h1w1_k1_c1", (1, 1, 1, 1), (1, 1, 1)),
    ConvCase("h1w1_k3_same", (1, 1, 1, 3), (3, 3, 2), 1, "SAME"),
    ConvCase("h2w3_k5x4_s2_same", (1, 2, 3, 5), (5, 4, 3), 2, "SAME"),
    ConvCase("h2w2_k3_d2_same", (1, 2, 2, 3), (3, 3, 2), 1, "SAME", 2),
    ConvCase("h1w9_k1x3_s1x2_same", (1, 1, 9, 3), (1, 3, 4), (1, 2), "SAME"),
    ConvCase("h9w1_k3x1_s2x1_valid", (1, 9, 1, 3), (3, 1, 4), (2, 1), "VALID"),
    ConvCase("h3w3_k2_s3_same", (1, 3, 3, 2), (2, 2, 3), 3, "SAME"),
    # Odd and even input sizes, kernels 1 to 7 (even and non-square).
    ConvCase("h7w9_k3_c17_same", (1, 7, 9, 17), (3, 3, 5), 1, "SAME"),
    ConvCase("h8w6_k2_o17_same", (2, 8, 6, 3), (2, 2, 17), 1, "SAME"),
    ConvCase("h6w7_k4_same", (1, 6, 7, 3), (4, 4, 3), 1, "SAME"),
    ConvCase("h9w8_k6x2_same", (1, 9, 8, 2), (6, 2, 4), 1, "SAME"),
    ConvCase("h8w8_k7_c1_same", (1, 8, 8, 1), (7, 7, 2), 1, "SAME"),
    ConvCase("h9w10_k7_o1_valid", (1, 9, 10, 3), (7, 7, 1), 1, "VALID"),
    ConvCase("h5w5_k5_valid_1x1_out", (1, 5, 5, 2), (5, 5, 3), 1, "VALID"),
    ConvCase("h7w6_k2x5_valid", (1, 7, 6, 3), (2, 5, 2), 1, "VALID"),
    ConvCase("h10w9_k6_s2_same", (1, 10, 9, 4), (6, 6, 3), 2, "SAME"),
    ConvCase("h7w7_k4x3_s2_same", (1, 7, 7, 3), (4, 3, 5), 2, "SAME"),
    # Strides 1 to 3, also larger than the kernel (uncovered input positions).
    ConvCase("h11w10_k5_s3_same", (2, 11, 10, 3), (5, 5, 7), 3, "SAME"),
    ConvCase("h7w8_k1_s3_valid", (1, 7, 8, 5), (1, 1, 3), 3, "VALID"),
    ConvCase("h10w9_k2_s3_valid", (1, 10, 9, 3), (2, 2, 4), 3, "VALID"),
    ConvCase("h10w10_k2_s3_same", (1, 10, 10, 2), (2, 2, 3), 3, "SAME"),
    ConvCase("h8w9_k1_s2_same", (1, 8, 9, 3), (1, 1, 2), 2, "SAME"),
    ConvCase("h9w11_k3_s2x3_valid", (1, 9, 11, 3), (3, 3, 5), (2, 3), "VALID"),
    ConvCase("h8w8_k2x1_s1x3_valid", (1, 8, 8, 2), (2, 1, 3), (1, 3), "VALID"),
    # Dilations 1 to 3, alone and with strides.
    ConvCase("h9w9_k3_d2_same", (1, 9, 9, 3), (3, 3, 4), 1, "SAME", 2),
    ConvCase("h8w9_k2_d3_valid", (1, 8, 9, 2), (2, 2, 3), 1, "VALID", 3),
    ConvCase("h10w11_k3_d2x3_same", (1, 10, 11, 3), (3, 3, 2), 1, "SAME", (2, 3)),
    ConvCase("h11w10_k3_s2_d2_same", (1, 11, 10, 3), (3, 3, 3), 2, "SAME", 2),
    ConvCase("h12w13_k3x2_s3_d3_valid", (1, 12, 13, 1), (3, 2, 2), 3, "VALID", 3),
    ConvCase("h5w5_k3_d2_valid_1x1_out", (1, 5, 5, 1), (3, 3, 2), 1, "VALID", 2),
    ConvCase("h9w8_k4_d2_s2_valid", (1, 9, 8, 2), (4, 4, 3), 2, "VALID", (2, 1)),
    # Channel counts that are not multiples of the vector widths.
    ConvCase("c65_o17_k3_same", (1, 5, 6, 65), (3, 3, 17), 1, "SAME"),
    ConvCase("c17_o65_k3_valid", (1, 6, 5, 17), (3, 3, 65), 1, "VALID"),
    ConvCase("c33_o31_k1_b2", (2, 5, 5, 33), (1, 1, 31)),
    ConvCase("c127_o9_k2_same", (1, 4, 4, 127), (2, 2, 9), 1, "SAME"),
    ConvCase("c5_o33_k3x5_s2_same", (1, 7, 9, 5), (3, 5, 33), 2, "SAME"),
    ConvCase("c3_o1_k3_same", (1, 6, 6, 3), (3, 3, 1), 1, "SAME"),
    ConvCase("c2_o7_b3_valid", (3, 5, 7, 2), (3, 3, 7), 1, "VALID"),
    ConvCase("c16_o32_k3_same", (1, 5, 5, 16), (3, 3, 32), 1, "SAME"),
    # Reductions past one 256-term block: forward K = 7*7*65 = 3185, filter
    # gradient over 2*15*20 = 600 positions.
    ConvCase("c65_k7_same", (1, 7, 7, 65), (7, 7, 3), 1, "SAME"),
    ConvCase("b2_h15w20_600_positions", (2, 15, 20, 3), (3, 3, 4), 1, "SAME"),
    ConvCase("o129_k3_same", (1, 4, 5, 2), (3, 3, 129), 1, "SAME"),
    # Zero-size cases: outputs keep their shape, every sum is 0.
    ConvCase("batch0_same", (0, 5, 5, 3), (3, 3, 4), 1, "SAME"),
    ConvCase("height0_same", (1, 0, 5, 3), (3, 3, 4), 1, "SAME"),
    ConvCase("h0w0_k2_same", (1, 0, 0, 2), (2, 2, 3), 1, "SAME"),
    ConvCase("width0_s2_same", (2, 4, 0, 3), (2, 2, 2), 2, "SAME"),
    ConvCase("channels0_valid", (1, 4, 4, 0), (2, 2, 3), 1, "VALID"),
    ConvCase("filters0_same", (1, 5, 5, 3), (3, 3, 0), 1, "SAME"),
]

CASES_BY_ID = {case.id: case for case in CONV_CASES}
