# Trip X: carry .whl .whl-c47a .whl-c47c .whl-q47: stage the cutlass-dsl 4.7.1 stack.
mkdir -p /tmp/c47 && cp .whl-c47a/* .whl-c47c/* .whl-q47/* /tmp/c47/ && ls /tmp/c47 | wc -l
