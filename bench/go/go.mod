module libcaller/bench/go

go 1.19
