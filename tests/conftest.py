import os
import sys

# the project is a set of flat scripts, imported from the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
