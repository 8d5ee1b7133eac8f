"""SpaceNet-style capacity study on split-MNIST: cl_split_mnist.py with SpaceNet-style only and
fewer reserved neurons per task (20, 40, 60), so the hidden layers are not fully reserved after
the last task (5 tasks x 80 = 400 = the hidden width in cl_split_mnist.py), and 80 again (a
rerun of cl_split_mnist.py's runs that also records each task's accuracy before consolidation).
The values were not chosen on a validation split.

Run (one run at a time; each seed of each setting is appended to the same file):
  for n in 20 40 60 80; do for s in 0 1 2; do
    python -m experiments.continual --config=experiments/configs/cl_split_mnist_capacity.py \\
        --out=results/cl_split_mnist_capacity --set neurons_per_task=$n --set "seeds=[$s]"
  done; done
"""

from experiments.configs import cl_split_mnist


def get_config():
    c = cl_split_mnist.get_config()
    c.methods = ("spacenet",)
    c.neurons_per_task = 40
    return c
