/*
 * The kernel's floor for taking 2 MiB subblocks out of use from userspace, with no
 * Python in the way: per subblock, one pread of its /proc/kpageflags entries, one
 * soft_offline_page write per 4 KiB page (its byte address, as vmem_guest writes it),
 * one more pread to count the pages now KPF_HWPOISON; then every page given back
 * through debugfs hwpoison/unpoison-pfn, timed the same way.
 *
 * Built static on the host (scripts/subblock_floor.py) and run as root in the guest:
 *   soft_offline_floor FIRST_PFN NR_SUBBLOCKS [PAGES_PER_SUBBLOCK]
 * One JSON object per line on stdout: {"phase": ..., "subblock": i, "seconds": s, ...}.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define KPF_BUDDY 10
#define KPF_HWPOISON 19
#define MAX_PAGES 4096

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void read_flags(int fd, uint64_t pfn, int n, uint64_t *flags)
{
	ssize_t want = (ssize_t)n * 8;
	if (pread(fd, flags, want, pfn * 8) != want) {
		perror("pread kpageflags");
		exit(1);
	}
}

static int count_bit(const uint64_t *flags, int n, int bit)
{
	int c = 0;
	for (int i = 0; i < n; i++)
		c += (flags[i] >> bit) & 1;
	return c;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s FIRST_PFN NR_SUBBLOCKS [PAGES_PER_SUBBLOCK]\n", argv[0]);
		return 2;
	}
	uint64_t first = strtoull(argv[1], NULL, 0);
	int nr = atoi(argv[2]);
	int per = argc > 3 ? atoi(argv[3]) : 512;
	if (per <= 0 || per > MAX_PAGES)
		return 2;
	long page = sysconf(_SC_PAGESIZE);
	int kpf = open("/proc/kpageflags", O_RDONLY | O_CLOEXEC);
	int soft = open("/sys/devices/system/memory/soft_offline_page", O_WRONLY | O_CLOEXEC);
	int unp = open("/sys/kernel/debug/hwpoison/unpoison-pfn", O_WRONLY | O_CLOEXEC);
	if (kpf < 0 || soft < 0 || unp < 0) {
		perror("open");
		return 1;
	}
	static uint64_t flags[MAX_PAGES];
	static char addr[MAX_PAGES][24];
	static int addr_len[MAX_PAGES];
	for (int s = 0; s < nr; s++) {
		uint64_t pfn0 = first + (uint64_t)s * per;
		for (int i = 0; i < per; i++)
			addr_len[i] = snprintf(addr[i], sizeof addr[i], "%#llx",
					       (unsigned long long)((pfn0 + i) * page));
		double t0 = now();
		read_flags(kpf, pfn0, per, flags);
		int free_before = count_bit(flags, per, KPF_BUDDY);
		double t1 = now();
		int refused = 0;
		for (int i = 0; i < per; i++)
			if (pwrite(soft, addr[i], addr_len[i], 0) < 0)
				refused++;
		double t2 = now();
		read_flags(kpf, pfn0, per, flags);
		int poisoned = count_bit(flags, per, KPF_HWPOISON);
		double t3 = now();
		printf("{\"phase\": \"take\", \"subblock\": %d, \"seconds\": %.6f, \"writes_s\": %.6f,"
		       " \"read_s\": %.6f, \"free_before\": %d, \"refused\": %d, \"poisoned\": %d}\n",
		       s, t3 - t0, t2 - t1, (t1 - t0) + (t3 - t2), free_before, refused, poisoned);
	}
	for (int s = 0; s < nr; s++) {
		uint64_t pfn0 = first + (uint64_t)s * per;
		char text[24];
		double t0 = now();
		int refused = 0;
		for (int i = 0; i < per; i++) {
			int len = snprintf(text, sizeof text, "%llu", (unsigned long long)(pfn0 + i));
			if (write(unp, text, len) < 0)
				refused++;
		}
		double t1 = now();
		read_flags(kpf, pfn0, per, flags);
		int poisoned = count_bit(flags, per, KPF_HWPOISON);
		double t2 = now();
		printf("{\"phase\": \"give_back\", \"subblock\": %d, \"seconds\": %.6f,"
		       " \"writes_s\": %.6f, \"refused\": %d, \"poisoned\": %d}\n",
		       s, t2 - t0, t1 - t0, refused, poisoned);
	}
	/* The floor of the system call alone: writes of an already poisoned page are
	 * answered 0 at once on 6.1 (MF_MSG_ALREADY_POISONED path); so a write of
	 * an invalid address (EINVAL in the parse) times syscall + sysfs entry. */
	double t0 = now();
	for (int i = 0; i < per; i++)
		(void)!pwrite(soft, "x", 1, 0);
	double t1 = now();
	printf("{\"phase\": \"einval_writes\", \"count\": %d, \"seconds\": %.6f}\n", per, t1 - t0);
	return 0;
}
