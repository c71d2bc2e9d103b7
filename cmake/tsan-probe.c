/* Built only in TSan builds. Runs nothing: if the TSan runtime cannot start
 * on this kernel ("unexpected memory mapping"), it fails before main. */
int main(void)
{
    return 0;
}
