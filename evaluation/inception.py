"""The FID Inception network: InceptionV3 as used by TensorFlow's FID code, ported the way pytorch-fid does.

Not run directly; `precision_recall.py` builds it. The parameter names equal those of torchvision's
`inception_v3(num_classes=1008, aux_logits=False)`, so pytorch-fid's weight file
`pt_inception-2015-12-05-6726825d.pth` loads as is, and with the same weights the 2048-d pool3 features
equal pytorch-fid's. `dims` picks pytorch-fid's `--dims` output (64 / 192 / 768 / 2048): the block output
after the first max pool, after the second max pool, after Mixed_6e (where the aux branch starts) or pool3,
each globally average-pooled as pytorch-fid's `get_activations` does. The TF graph differs from torchvision's InceptionV3 in three places, reproduced here:
the average pools inside the A, C and first E blocks ignore padded zeros (`count_include_pad=False`), and
the last E block pools with a max instead of an average. Written here instead of patching torchvision's
blocks so that the FID path does not change when torchvision changes its Inception.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS_FILE)
FID_DIMS = (64, 192, 768, 2048)  # pytorch-fid's InceptionV3.BLOCK_INDEX_BY_DIM keys


class Conv(nn.Module):
    """Convolution without bias, BatchNorm (eps 1e-3 as in the TF graph), ReLU."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    # TF's 3x3 average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """Mixed_5b/5c/5d: 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1 = Conv(cin, 48, 1)
        self.branch5x5_2 = Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class BlockB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class BlockC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 branches."""

    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1 = Conv(cin, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = Conv(cin, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_tf_avg_pool(x))], 1)


class BlockD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = Conv(cin, 192, 1)
        self.branch3x3_2 = Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class BlockE(nn.Module):
    """Mixed_7b (average pool) and Mixed_7c (max pool: how the TF FID graph was built)."""

    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(cin, 448, 1)
        self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        a = torch.cat([self.branch3x3_2a(a), self.branch3x3_2b(a)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = (F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool
                  else _tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), a, d, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Maps images in [0, 1] (B x 3 x H x W) to the pool3 features used by FID (or an earlier block's, `dims`)."""

    def __init__(self, dims=2048):
        super().__init__()
        if dims not in FID_DIMS:
            raise ValueError(f"dims must be one of {', '.join(map(str, FID_DIMS))}, got {dims}")
        self.dims = dims
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        # The 1008-way logits layer ships in the weight file; kept so the file loads strictly (unused).
        self.fc = nn.Linear(2048, 1008)

    @staticmethod
    def preprocess(x):
        """pytorch-fid's input path: bilinear resize to 299x299 (no corner alignment), [0,1] -> [-1,1]."""
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1

    def forward(self, x):
        x = self.preprocess(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # end of pytorch-fid's block 0 (64 channels)
        if self.dims > 64:
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
            x = F.max_pool2d(x, kernel_size=3, stride=2)  # block 1 (192)
        if self.dims > 192:
            for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                          self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
                x = block(x)  # block 2 (768): up to where the aux classifier branches off
        if self.dims > 768:
            x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # block 3 (2048): pool3
        return torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
